#!/bin/sh
# Runs once per release, in the release directory, before it goes live.
set -eu
{
    echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit=${FRAISIER_COMMIT:-unknown}"
    echo "release=${FRAISIER_RELEASE_ID:-unknown}"
} > BUILD_INFO
python3 -m py_compile app.py
