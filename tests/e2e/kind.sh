#!/usr/bin/env bash
# drover on a real cluster: kind (Kubernetes in Docker). Not run in CI (it
# needs Docker, kind, kubectl, helm and image pulls); run it by hand:
#
#   tests/e2e/kind.sh                 # create cluster drover-e2e, test, delete it
#   KEEP_CLUSTER=1 tests/e2e/kind.sh  # leave the cluster for a look around
#   CLUSTER=mine tests/e2e/kind.sh    # use (and keep) an existing kind cluster
#
# What it proves, in a namespace that enforces the "restricted" Pod Security
# Standard:
#   1. the image builds from the Dockerfile and the chart installs (two pods,
#      two workers each, contexts from the mounted ConfigMap -- the default
#      `volume` source: no service-account token, no Role -- an admin token
#      from a Secret) and `helm test` passes;
#   2. while a client sends requests through the Service without pause:
#      - POST /admin/stop with the token drains one pod: its container exits
#        0 and is restarted, a POST without the token gets 401;
#      - deleting another pod (SIGTERM) drains it: it is gone after about
#        drainDelay, long before its grace period;
#      and not one request fails;
#   3. an edit of the ConfigMap reaches the workers through the mounted file
#      (rolling restart in the pod, no pod restart);
#   4. `kubectl exec ... -- drover check` works in the shell-less image;
#   5. wrap mode: an app image built FROM scratch around a static server
#      (tests/ship/wrap-app, no drover in it) runs behind drover, copied in by
#      the chart's initContainer (`drover install`), with its contexts read
#      through the API this time (`contexts.source=api`: token and Role):
#      its workers answer with their contexts, `helm test` passes, and a pod
#      deletion drains within the grace period.
set -euo pipefail

cd "$(dirname "$0")/../.."

CLUSTER="${CLUSTER:-drover-e2e}"
IMAGE="${IMAGE:-drover:e2e}"
APP_IMAGE="${APP_IMAGE:-drover-wrap-app:e2e}"
WRAP_RELEASE="${WRAP_RELEASE:-wrapped}"
NS="${NS:-drover-e2e}"
RELEASE="${RELEASE:-drover}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
BUSYBOX="${BUSYBOX:-busybox:1.37.0}"
# Seconds of traffic; the stop and the deletion happen inside this window.
LOAD_SECONDS="${LOAD_SECONDS:-75}"
DRAIN_DELAY=5
GRACEFUL_TIMEOUT=20
TOKEN="e2e-$(date +%s)-$RANDOM$RANDOM"
# The chart's full name: the release name when it contains "drover".
case "$RELEASE" in
  *drover*) FULLNAME="$RELEASE" ;;
  *) FULLNAME="$RELEASE-drover" ;;
esac
SVC="http://${FULLNAME}.${NS}.svc:8000"

log() { printf '\n== %s\n' "$*" >&2; }
fail() {
  printf 'kind.sh: FAIL: %s\n' "$*" >&2
  exit 1
}

for tool in docker kind kubectl helm cc; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool is required"
done

created=0    # this run created the cluster
in_cluster=0 # KUBECONFIG points at the kind cluster
diagnostics() {
  log "diagnostics"
  kubectl -n "$NS" get all,configmap,secret,pdb -o wide || true
  kubectl -n "$NS" describe pods || true
  for p in $(kubectl -n "$NS" get pods -o name 2>/dev/null); do
    echo "--- logs $p" >&2
    kubectl -n "$NS" logs "$p" --all-containers --prefix --tail=100 || true
    kubectl -n "$NS" logs "$p" --all-containers --prefix --previous --tail=100 2>/dev/null || true
  done
}
cleanup() {
  local status=$?
  trap - EXIT
  if [ "$status" -ne 0 ] && [ "$in_cluster" = 1 ]; then
    diagnostics
  fi
  jobs -p | xargs -r kill 2>/dev/null || true
  if [ "$created" = 1 ] && [ "$KEEP_CLUSTER" != 1 ]; then
    log "deleting kind cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG" || true
  elif [ "$created" = 1 ]; then
    echo "cluster $CLUSTER kept: kind delete cluster --name $CLUSTER" >&2
    echo "its kubeconfig: export KUBECONFIG=$KUBECONFIG" >&2
  fi
  if [ "$created" != 1 ] || [ "$KEEP_CLUSTER" != 1 ]; then
    case "${KUBECONFIG:-}" in
      */drover-e2e-kubeconfig.*) rm -f "$KUBECONFIG" ;;
    esac
  fi
  exit "$status"
}
trap cleanup EXIT

# Runs a command in the namespace's client pod (busybox).
client() { kubectl -n "$NS" exec client -- "$@"; }

# The drover pods, ready or not, oldest first.
drover_pods() {
  kubectl -n "$NS" get pods \
    -l "app.kubernetes.io/name=drover,app.kubernetes.io/instance=$RELEASE" \
    --sort-by=.metadata.creationTimestamp -o jsonpath='{.items[*].metadata.name}'
}

log "building $IMAGE"
docker build -t "$IMAGE" .

log "building $APP_IMAGE (a static server FROM scratch, no drover)"
app_ctx="$(mktemp -d "${TMPDIR:-/tmp}/drover-e2e-app.XXXXXX")"
cc -static -O2 -o "$app_ctx/server" tests/ship/wrap-app/server.c
docker build -t "$APP_IMAGE" -f tests/ship/wrap-app/Dockerfile "$app_ctx"
rm -rf "$app_ctx"

# A kubeconfig of our own, so the user's current context is left alone.
KUBECONFIG="$(mktemp "${TMPDIR:-/tmp}/drover-e2e-kubeconfig.XXXXXX")"
export KUBECONFIG
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "using existing kind cluster $CLUSTER"
  kind export kubeconfig --name "$CLUSTER" --kubeconfig "$KUBECONFIG"
else
  log "creating kind cluster $CLUSTER"
  created=1
  kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG" --wait 180s
fi
in_cluster=1
kind load docker-image "$IMAGE" "$APP_IMAGE" --name "$CLUSTER"

log "namespace $NS enforcing the restricted Pod Security Standard"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl label namespace "$NS" --overwrite \
  pod-security.kubernetes.io/enforce=restricted \
  pod-security.kubernetes.io/warn=restricted

log "helm install $RELEASE"
helm upgrade --install "$RELEASE" charts/drover -n "$NS" --wait --timeout 5m \
  --set image.repository="${IMAGE%%:*}" \
  --set image.tag="${IMAGE##*:}" \
  --set image.pullPolicy=Never \
  --set replicaCount=2 \
  --set workers=2 \
  --set-json 'workerContexts=[{"shard":0},{"shard":1}]' \
  --set drainDelay="$DRAIN_DELAY" \
  --set gracefulTimeout="$GRACEFUL_TIMEOUT" \
  --set adminToken.enabled=true \
  --set adminToken.value="$TOKEN" \
  --set tests.image.repository="${BUSYBOX%%:*}" \
  --set tests.image.tag="${BUSYBOX##*:}"

log "helm test"
helm test "$RELEASE" -n "$NS" --timeout 3m

log "volume source: no API access"
first_pod=$(drover_pods | cut -d' ' -f1)
automount=$(kubectl -n "$NS" get pod "$first_pod" -o jsonpath='{.spec.automountServiceAccountToken}')
[ "$automount" = false ] || fail "the service-account token is mounted ($automount) with the volume source"
if kubectl -n "$NS" get role "$FULLNAME" >/dev/null 2>&1; then
  fail "a Role was created although the volume source needs none"
fi

# Restricted-compliant busybox pods: `client` for one-off calls, `load` for traffic.
busybox_pod() {
  local name=$1 script=$2
  kubectl -n "$NS" apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $name
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  enableServiceLinks: false
  securityContext:
    runAsNonRoot: true
    runAsUser: 65534
    runAsGroup: 65534
    seccompProfile: {type: RuntimeDefault}
  containers:
    - name: main
      image: $BUSYBOX
      imagePullPolicy: IfNotPresent
      command:
        - sh
        - -c
        - |
$(printf '%s\n' "$script" | sed 's/^/          /')
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities: {drop: [ALL]}
EOF
}

busybox_pod client 'sleep 3600'
kubectl -n "$NS" wait --for=condition=Ready pod/client --timeout=120s

log "drover check through kubectl exec (no shell in the image)"
kubectl -n "$NS" exec "deploy/$FULLNAME" -- drover check

# shellcheck disable=SC2016 # $(...) and $vars below run in the pod's sh.
# Four clients in parallel, each request on a new connection through the
# Service, each one taking 50 ms in the built-in app; a failure is a request
# that got no 2xx answer within 5 s.
load_script='end=$(( $(date +%s) + '"$LOAD_SECONDS"' ))
loop() {
  ok=0; bad=0
  while [ "$(date +%s)" -lt "$end" ]; do
    if wget -q -O /dev/null -T 5 "'"$SVC"'/sleep?ms=50"; then ok=$((ok+1)); else bad=$((bad+1)); echo "FAILED request at $(date +%T) in client $1"; fi
  done
  echo "client $1: ok=$ok failed=$bad"
}
for i in 1 2 3 4; do loop "$i" & done
wait'
busybox_pod load "$load_script"
kubectl -n "$NS" wait --for=condition=Ready pod/load --timeout=120s
load_started=$(date +%s)

read -r -a pods <<<"$(drover_pods)"
[ "${#pods[@]}" -eq 2 ] || fail "expected 2 drover pods, found: ${pods[*]:-none}"
stopped_pod=${pods[0]}
deleted_pod=${pods[1]}
sleep 10

log "POST /admin/stop to $stopped_pod"
pod_ip=$(kubectl -n "$NS" get pod "$stopped_pod" -o jsonpath='{.status.podIP}')
if client wget -q -O /dev/null -T 5 --post-data '' "http://$pod_ip:8001/admin/stop" 2>/dev/null; then
  fail "POST /admin/stop without the token was accepted"
fi
client wget -q -O - -T 5 --post-data '' \
  --header "Authorization: Bearer $TOKEN" "http://$pod_ip:8001/admin/stop" >/dev/null ||
  fail "POST /admin/stop with the token was refused"

# The container drains and exits 0, and the kubelet restarts it.
deadline=$(($(date +%s) + DRAIN_DELAY + GRACEFUL_TIMEOUT + 60))
while :; do
  restarts=$(kubectl -n "$NS" get pod "$stopped_pod" \
    -o jsonpath='{.status.containerStatuses[0].restartCount}')
  [ "${restarts:-0}" -lt 1 ] || break
  [ "$(date +%s)" -lt "$deadline" ] || fail "$stopped_pod did not exit after /admin/stop"
  sleep 1
done
code=$(kubectl -n "$NS" get pod "$stopped_pod" \
  -o jsonpath='{.status.containerStatuses[0].lastState.terminated.exitCode}')
[ "$code" = 0 ] || fail "$stopped_pod exited $code after /admin/stop (0 is a clean drain)"
echo "$stopped_pod: drained, exited 0, restarted" >&2
kubectl -n "$NS" wait --for=condition=Ready "pod/$stopped_pod" --timeout=120s

log "deleting $deleted_pod (SIGTERM)"
kubectl -n "$NS" logs -f "$deleted_pod" >"${TMPDIR:-/tmp}/drover-e2e-$deleted_pod.log" 2>&1 &
t0=$(date +%s)
kubectl -n "$NS" delete pod "$deleted_pod" --wait=true --timeout=120s
took=$(($(date +%s) - t0))
echo "$deleted_pod: gone after ${took}s (drain delay ${DRAIN_DELAY}s, grace $((DRAIN_DELAY + GRACEFUL_TIMEOUT + 5))s)" >&2
[ "$took" -ge "$DRAIN_DELAY" ] || fail "$deleted_pod was gone before the drain delay ended"
[ "$took" -lt $((DRAIN_DELAY + GRACEFUL_TIMEOUT)) ] ||
  fail "$deleted_pod took ${took}s: drover did not finish its drain on SIGTERM"

log "waiting for the traffic to end"
deadline=$((load_started + LOAD_SECONDS + 60))
while :; do
  phase=$(kubectl -n "$NS" get pod load -o jsonpath='{.status.phase}')
  case "$phase" in
    Succeeded | Failed) break ;;
  esac
  [ "$(date +%s)" -lt "$deadline" ] || fail "the load pod did not finish"
  sleep 2
done
kubectl -n "$NS" logs load >&2
summary=$(kubectl -n "$NS" logs load | grep -c '^client [0-9]*: ok=[1-9][0-9]* failed=0$' || true)
if [ "$phase" != Succeeded ] || [ "$summary" != 4 ]; then
  fail "requests failed during the stop and the deletion (see the load pod's log above)"
fi
echo "no failed request through /admin/stop and a pod deletion" >&2

log "editing the worker contexts (the kubelet updates the mounted file)"
kubectl -n "$NS" patch configmap "$FULLNAME-worker-contexts" --type merge \
  -p '{"data":{"worker-contexts.yaml":"- {shard: 10}\n- {shard: 11}\n"}}'
deadline=$(($(date +%s) + 180))
until client wget -q -O - -T 5 "$SVC/" 2>/dev/null | grep -q '"shard":1[01]'; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "the new contexts did not reach the workers"
  sleep 2
done
echo "new contexts served: $(client wget -q -O - -T 5 "$SVC/")" >&2

log "wrap mode: helm install $WRAP_RELEASE ($APP_IMAGE behind drover)"
WRAP_FULLNAME="$WRAP_RELEASE-drover"
helm upgrade --install "$WRAP_RELEASE" charts/drover -n "$NS" --wait --timeout 5m \
  --set image.repository="${APP_IMAGE%%:*}" \
  --set image.tag="${APP_IMAGE##*:}" \
  --set image.pullPolicy=Never \
  --set wrap.enabled=true \
  --set wrap.image.repository="${IMAGE%%:*}" \
  --set wrap.image.tag="${IMAGE##*:}" \
  --set wrap.image.pullPolicy=Never \
  --set-json 'command=["/app/server"]' \
  --set contexts.source=api \
  --set replicaCount=2 \
  --set workers=2 \
  --set-json 'workerContexts=[{"shard":20},{"shard":21}]' \
  --set drainDelay="$DRAIN_DELAY" \
  --set gracefulTimeout="$GRACEFUL_TIMEOUT" \
  --set tests.image.repository="${BUSYBOX%%:*}" \
  --set tests.image.tag="${BUSYBOX##*:}"
helm test "$WRAP_RELEASE" -n "$NS" --timeout 3m
kubectl -n "$NS" get role "$WRAP_FULLNAME" >/dev/null || fail "no Role for the api source"
wrap_svc="http://${WRAP_FULLNAME}.${NS}.svc:8000"
answer=$(client wget -q -O - -T 5 "$wrap_svc/")
echo "$answer" | grep -q '"app":"static-server"' || fail "the wrapped app did not answer: $answer"
echo "$answer" | grep -q '"shard":2[01]' || fail "the wrapped app's worker has no context: $answer"
echo "wrapped app served: $answer" >&2
read -r wrap_pod _ <<<"$(kubectl -n "$NS" get pods \
  -l "app.kubernetes.io/name=drover,app.kubernetes.io/instance=$WRAP_RELEASE" \
  -o jsonpath='{.items[*].metadata.name}')"
t0=$(date +%s)
kubectl -n "$NS" delete pod "$wrap_pod" --wait=true --timeout=120s
took=$(($(date +%s) - t0))
echo "$wrap_pod: gone after ${took}s" >&2
[ "$took" -ge "$DRAIN_DELAY" ] || fail "$wrap_pod was gone before the drain delay ended"
[ "$took" -lt $((DRAIN_DELAY + GRACEFUL_TIMEOUT)) ] ||
  fail "$wrap_pod took ${took}s: the wrapped drover did not finish its drain on SIGTERM"

log "PASS"
