#!/bin/sh
# Creates fedagent's namespaces and custom search attributes on the Temporal cluster, then
# stays up so that its healthcheck (check.sh) keeps saying whether they are all there.
#   FEDAGENT_NAMESPACES         "hub spoke"
#   FEDAGENT_SEARCH_ATTRIBUTES  "AgentId=Keyword TaskId=Keyword ..."
#   FEDAGENT_NAMESPACE_RETENTION (default 30d): how long closed runs stay visible
set -eu

: "${TEMPORAL_ADDRESS:?}" "${FEDAGENT_NAMESPACES:?}" "${FEDAGENT_SEARCH_ATTRIBUTES:?}"
RETENTION=${FEDAGENT_NAMESPACE_RETENTION:-30d}
MARKER=${FEDAGENT_INIT_MARKER:-/tmp/fedagent-initialized}
rm -f "$MARKER"

echo "waiting for Temporal at $TEMPORAL_ADDRESS"
until temporal operator cluster health --address "$TEMPORAL_ADDRESS" >/dev/null 2>&1; do
    sleep 2
done

for ns in $FEDAGENT_NAMESPACES; do
    if temporal operator namespace describe --namespace "$ns" --address "$TEMPORAL_ADDRESS" \
        >/dev/null 2>&1; then
        echo "namespace $ns exists"
    else
        temporal operator namespace create --namespace "$ns" --retention "$RETENTION" \
            --description "fedagent instance $ns" --address "$TEMPORAL_ADDRESS"
        echo "created namespace $ns"
    fi
done

# A new namespace takes a moment to reach every frontend: retry until it accepts attributes.
for ns in $FEDAGENT_NAMESPACES; do
    for attr in $FEDAGENT_SEARCH_ATTRIBUTES; do
        name=${attr%%=*}
        type=${attr#*=}
        tries=0
        until temporal operator search-attribute list --namespace "$ns" \
                --address "$TEMPORAL_ADDRESS" 2>/dev/null | grep -qw "$name"; do
            tries=$((tries + 1))
            if [ "$tries" -gt 60 ]; then
                echo "could not create search attribute $name in $ns" >&2
                exit 1
            fi
            # Created: list again at once; refused (namespace not everywhere yet): wait.
            temporal operator search-attribute create --namespace "$ns" --name "$name" \
                --type "$type" --address "$TEMPORAL_ADDRESS" 2>/dev/null || sleep 1
        done
        echo "search attribute $name ($type) in $ns"
    done
done

touch "$MARKER"
echo "Temporal is ready for fedagent"
# Stay up: the healthcheck re-verifies; `docker compose up` shows this service healthy.
pid=
trap 'kill $pid 2>/dev/null; exit 0' TERM INT
while :; do
    sleep 3600 &
    pid=$!
    wait $pid
done
