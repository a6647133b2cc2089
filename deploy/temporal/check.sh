#!/bin/sh
# Healthcheck of temporal-init: every namespace and search attribute fedagent needs exists.
set -eu
[ -f "${FEDAGENT_INIT_MARKER:-/tmp/fedagent-initialized}" ] || exit 1
for ns in $FEDAGENT_NAMESPACES; do
    listed=$(temporal operator search-attribute list --namespace "$ns" \
        --address "$TEMPORAL_ADDRESS" 2>/dev/null) || exit 1
    for attr in $FEDAGENT_SEARCH_ATTRIBUTES; do
        echo "$listed" | grep -qw "${attr%%=*}" || exit 1
    done
done
