"""OCI registries (`oci://REGISTRY/REPOSITORY:TAG` or `@sha256:DIGEST`): reference parsing, credentials
and auth schemes, and the registry HTTP API v2 client the oci:// source and destination are built on."""
