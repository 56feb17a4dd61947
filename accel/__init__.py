"""Step-skipping acceleration (TeaCache, First Block Cache, DBCache); filled by a later issue."""
