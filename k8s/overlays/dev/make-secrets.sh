#!/bin/sh
# Creates the dev overlay's credentials (random tokens, one per scope and per site) in ./secrets, which git
# ignores. Run it once before `kubectl apply -k k8s/overlays/dev`; re-running keeps existing tokens.
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
for name in operator-token audit-token site-t1-token site-t1ce-token site-t2-token site-flair-token; do
  [ -s "secrets/$name" ] || python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > "secrets/$name"
done
echo "credentials in $(pwd)/secrets"
