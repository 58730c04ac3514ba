#!/bin/sh
# Creates the dev overlay's credentials (random tokens: the operator's, and per site the aggregator's and the
# central audit's, so no token opens every site) in ./secrets, which git
# ignores. Run it once before `kubectl apply -k k8s/overlays/dev`; re-running keeps existing tokens.
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
for name in operator-token site-t1-token site-t1ce-token site-t2-token site-flair-token \
    site-t1-audit-token site-t1ce-audit-token site-t2-audit-token site-flair-audit-token; do
  [ -s "secrets/$name" ] || python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > "secrets/$name"
done
echo "credentials in $(pwd)/secrets"
