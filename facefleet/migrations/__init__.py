"""The PostgreSQL job store's schema: versioned SQL files `NNNN_name.sql`, applied in order by
`facefleet.pgstore.migrate` (`facefleet store migrate`), each in its own transaction. Never
edit a released file: add the next one. Shipped as package data (they are read with
importlib.resources)."""
