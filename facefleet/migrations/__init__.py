"""The PostgreSQL job store's schema: versioned SQL files `NNNN_name.sql`, applied in order by
`facefleet.pgstore.migrate` (`facefleet store migrate`), each in its own transaction. Never
edit a released file: add the next one. A file that builds of an older schema version run on
unchanged (a dropped index, a new column nobody older reads) says from which, on a line of its
own: `-- facefleet-compatible-from: N`; a build refuses a schema ahead of it unless every later
migration allows it. Shipped as package data (they are read with
importlib.resources)."""
