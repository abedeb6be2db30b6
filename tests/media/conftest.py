"""Media-store fixtures live in tests/conftest.py (s3_server, s3_env, s3_bucket, s3_media_url):
the spine and gateway suites run on the same S3-API server."""
