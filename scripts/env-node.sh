# shellcheck shell=bash
# The node of the local environment, sourced by scripts/env (`scripts/env up --node`): containerd, kubelet,
# kube-scheduler and a full kube-controller-manager on this machine, pods on a bridge of their own.
#
# What pods can reach, and how (no kube-proxy, no cluster DNS: warren's pods need only these three):
#   the broker            $NODE_IP:5672 / :15672, user warren-pod   (DNAT to RabbitMQ on 127.0.0.1)
#   the API server        the `kubernetes` Service, $KUBERNETES_SERVICE_IP:443   (DNAT to 127.0.0.1:$APISERVER_PORT)
# $NODE_IP is the gateway address on the pods' bridge and the node's InternalIP; nothing listens on eth0. RabbitMQ's
# guest user may only log in over loopback, and a pod is not loopback, so pods get a user of their own.
#
# Everything lives under $STATE/node (containerd's root and state, the kubelet's root and pod logs, CNI config and
# IP allocations); `node_down` kills every container, unmounts and deletes all of it except containerd's image store,
# and removes the bridge, the NAT rules and the kubelet's cgroups.

NODE_NAME=${WARREN_NODE_NAME:-warren-node}
NODE_DIR=$STATE/node
BRIDGE=warren0
POD_CIDR=10.88.0.0/16
NODE_IP=10.88.0.1
KUBERNETES_SERVICE_IP=10.0.0.1   # the first address of kube-apiserver's --service-cluster-ip-range
SCHEDULER_PORT=${WARREN_SCHEDULER_PORT:-16259}
KUBELET_HEALTHZ_PORT=${WARREN_KUBELET_HEALTHZ_PORT:-10248}
CONTAINERD_SOCK=$NODE_DIR/containerd/containerd.sock
# Kept across `down` (images imported by scripts/build-images stay), removed by `purge`.
CONTAINERD_ROOT=$STATE/containerd-root
NAT_CHAIN=WARREN-ENV
POD_BROKER_USER=warren-pod

node_packages() {
  local packages=()
  command -v containerd >/dev/null || packages+=(containerd)
  command -v runc >/dev/null || packages+=(runc)
  [[ -x /usr/lib/cni/bridge ]] || packages+=(containernetworking-plugins)
  command -v iptables >/dev/null || packages+=(iptables)
  command -v conntrack >/dev/null || packages+=(conntrack)
  command -v buildah >/dev/null || packages+=(buildah)   # scripts/build-images
  (( ${#packages[@]} )) || return 0
  log "installing ${packages[*]} (apt-get)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >&2
}

# --- network: the pods' bridge and the two ways out of a pod ------------------------------------------------------

node_network_up() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  ip addr replace "$NODE_IP/${POD_CIDR#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # DNAT to 127.0.0.1 needs route_localnet on the interface the packets come in on (as kube-proxy does).
  sysctl -qw "net.ipv4.conf.$BRIDGE.route_localnet=1"
  iptables -t nat -N "$NAT_CHAIN" 2>/dev/null || iptables -t nat -F "$NAT_CHAIN"
  iptables -t nat -C PREROUTING -i "$BRIDGE" -j "$NAT_CHAIN" 2>/dev/null ||
    iptables -t nat -A PREROUTING -i "$BRIDGE" -j "$NAT_CHAIN"
  local port
  for port in "$AMQP_PORT" "$MGMT_PORT"; do
    iptables -t nat -A "$NAT_CHAIN" -d "$NODE_IP" -p tcp --dport "$port" -j DNAT --to-destination "127.0.0.1:$port"
  done
  iptables -t nat -A "$NAT_CHAIN" -d "$KUBERNETES_SERVICE_IP" -p tcp --dport 443 \
    -j DNAT --to-destination "127.0.0.1:$APISERVER_PORT"
  mkdir -p "$NODE_DIR/cni/net.d" "$NODE_DIR/cni/ipam"
  cat >"$NODE_DIR/cni/net.d/10-warren.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "warren",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$NODE_DIR/cni/ipam",
        "ranges": [[{ "subnet": "$POD_CIDR", "gateway": "$NODE_IP" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "loopback" }
  ]
}
EOF
}

node_network_down() {
  if iptables -t nat -S "$NAT_CHAIN" >/dev/null 2>&1; then
    while iptables -t nat -D PREROUTING -i "$BRIDGE" -j "$NAT_CHAIN" 2>/dev/null; do :; done
    iptables -t nat -F "$NAT_CHAIN"
    iptables -t nat -X "$NAT_CHAIN"
  fi
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link delete "$BRIDGE"; fi
}

# --- the broker user pods log in as -------------------------------------------------------------------------------

pod_broker_password() {
  local file=$STATE/pod-broker-password
  [[ -s $file ]] || (umask 077; openssl rand -hex 16 >"$file")
  cat "$file"
}

pod_broker_user_up() {
  local password
  password=$(pod_broker_password)
  # The management API, not rabbitmqctl: it works the same for a broker scripts/env did not start.
  local api="http://127.0.0.1:$MGMT_PORT/api" auth=(-u guest:guest)
  curl -sf -m 10 "${auth[@]}" -X PUT -H 'content-type: application/json' "$api/users/$POD_BROKER_USER" \
    -d "{\"password\":\"$password\",\"tags\":\"monitoring\"}" -o /dev/null ||
    die "could not create the broker user $POD_BROKER_USER"
  curl -sf -m 10 "${auth[@]}" -X PUT -H 'content-type: application/json' \
    "$api/permissions/%2f/$POD_BROKER_USER" -d '{"configure":".*","write":".*","read":".*"}' -o /dev/null ||
    die "could not grant $POD_BROKER_USER access to vhost /"
}

pod_exports() {
  local password
  password=$(pod_broker_password)
  echo "export WARREN_POD_BROKER_URI='amqp://$POD_BROKER_USER:$password@$NODE_IP:$AMQP_PORT/%2f'"
  echo "export WARREN_POD_MANAGEMENT_URI='http://$POD_BROKER_USER:$password@$NODE_IP:$MGMT_PORT'"
  echo "export WARREN_NODE_NAME=$NODE_NAME"
  echo "export CONTAINERD_ADDRESS=$CONTAINERD_SOCK"
}

# --- containerd ---------------------------------------------------------------------------------------------------

containerd_ready() { ctr -a "$CONTAINERD_SOCK" version >/dev/null 2>&1; }

containerd_up() {
  if our_pid containerd >/dev/null; then
    wait_for "containerd (already running)" 30 containerd_ready && return 0
    die "containerd runs but does not answer (see $STATE/containerd.log)"
  fi
  mkdir -p "$NODE_DIR/containerd" "$CONTAINERD_ROOT"
  cat >"$NODE_DIR/containerd/config.toml" <<EOF
version = 2
root = "$CONTAINERD_ROOT"
state = "$NODE_DIR/containerd/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  # No registry is reachable: the pause image is built here (scripts/build-images) and imported.
  sandbox_image = "$PAUSE_IMAGE"
  # Without it every sandbox fails here: runc may not lower /proc/self/oom_score_adj in this VM.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni/net.d"
EOF
  log "starting containerd ($CONTAINERD_SOCK)"
  spawn containerd containerd --config "$NODE_DIR/containerd/config.toml"
  wait_for containerd 30 containerd_ready || die "containerd did not answer within 30s (see $STATE/containerd.log)"
}

# The sandbox image: scripts/pause.c, built and imported by `scripts/build-images --pause-only` (the same ref).
PAUSE_IMAGE=localhost/warren/pause:3.10

node_images_up() {
  # The pause image must be in containerd before the first pod; warren's images are loaded by the tests and the
  # demo (scripts/build-images), which rebuild them when the sources change.
  ctr -a "$CONTAINERD_SOCK" -n k8s.io images ls -q 2>/dev/null | grep -qxF "$PAUSE_IMAGE" && return 0
  [[ $(CONTAINERD_ADDRESS=$CONTAINERD_SOCK "$ROOT/scripts/build-images" --pause-only) == "$PAUSE_IMAGE" ]] ||
    die "scripts/build-images --pause-only did not load $PAUSE_IMAGE"
}

# --- kubelet, scheduler, controller-manager -----------------------------------------------------------------------

node_pki() {
  [[ -f $PKI/kubelet.crt ]] && return 0
  log "generating the kubelet's client certificate (system:node:$NODE_NAME)"
  leaf kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" \
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
}

kubelet_kubeconfig() {
  local b64="base64 -w0"
  cat >"$NODE_DIR/kubelet.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: warren-env
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $($b64 <"$PKI/ca.crt")
users:
- name: kubelet
  user:
    client-certificate-data: $($b64 <"$PKI/kubelet.crt")
    client-key-data: $($b64 <"$PKI/kubelet.key")
contexts:
- name: kubelet
  context: { cluster: warren-env, user: kubelet }
current-context: kubelet
EOF
  chmod 600 "$NODE_DIR/kubelet.kubeconfig"
}

kubelet_healthy() { curl -sf -m 2 "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz" -o /dev/null; }

kubelet_up() {
  if our_pid kubelet >/dev/null; then
    wait_for "kubelet (already running)" 60 kubelet_healthy && return 0
    die "kubelet runs but is not healthy (see $STATE/kubelet.log)"
  fi
  node_pki
  kubelet_kubeconfig
  mkdir -p "$NODE_DIR/kubelet" "$NODE_DIR/pod-logs"
  cat >"$NODE_DIR/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This host has cgroup v1 controllers and no systemd as PID 1.
cgroupDriver: cgroupfs
failCgroupV1: false
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
# Serve on the pods' bridge only (kubectl logs/exec come from the API server on this host).
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: { enabled: false }
  webhook: { enabled: true }
  x509: { clientCAFile: $PKI/ca.crt }
authorization:
  mode: Webhook
podLogsDir: $NODE_DIR/pod-logs
failSwapOn: false
resolvConf: /etc/resolv.conf
# A shared test machine: no evictions for disk or memory pressure, no image garbage collection.
evictionHard: { memory.available: "1Mi", nodefs.available: "1%", imagefs.available: "1%" }
# A pressure condition (and its NoSchedule taint) clears 30 s after the disk has room again, not 5 min.
evictionPressureTransitionPeriod: 30s
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 110
EOF
  log "starting kubelet (node $NODE_NAME, $NODE_IP)"
  spawn kubelet "$BIN/kubelet" --config="$NODE_DIR/kubelet/config.yaml" \
    --kubeconfig="$NODE_DIR/kubelet.kubeconfig" --root-dir="$NODE_DIR/kubelet/root" \
    --cert-dir="$NODE_DIR/kubelet/pki" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --v=1
  wait_for kubelet 60 kubelet_healthy || die "kubelet did not become healthy within 60s (see $STATE/kubelet.log)"
}

scheduler_healthy() { curl -skf -m 2 "https://127.0.0.1:$SCHEDULER_PORT/healthz" -o /dev/null; }

scheduler_up() {
  if our_pid kube-scheduler >/dev/null; then
    wait_for "kube-scheduler (already running)" 60 scheduler_healthy && return 0
    die "kube-scheduler runs but is not healthy (see $STATE/kube-scheduler.log)"
  fi
  log "starting kube-scheduler on 127.0.0.1:$SCHEDULER_PORT"
  spawn kube-scheduler "$BIN/kube-scheduler" --kubeconfig="$KUBECONFIG_FILE" \
    --authentication-kubeconfig="$KUBECONFIG_FILE" --authorization-kubeconfig="$KUBECONFIG_FILE" \
    --bind-address=127.0.0.1 --secure-port="$SCHEDULER_PORT" --leader-elect=false --v=1
  wait_for kube-scheduler 60 scheduler_healthy ||
    die "kube-scheduler did not become healthy within 60s (see $STATE/kube-scheduler.log)"
}

# The full controller-manager: Deployments, ReplicaSets, garbage collection, namespaces, service accounts, the
# root CA ConfigMap pods' tokens need, and the node lifecycle controller (it lifts the not-ready taint).
node_controller_manager_up() {
  if our_pid kube-controller-manager >/dev/null; then
    if [[ -f $STATE/kube-controller-manager.node ]]; then
      wait_for "kube-controller-manager (already running)" 60 kcm_healthy && return 0
    fi
    # The garbage-collector-only instance of `WARREN_CONTROLLER_MANAGER=1 up`: replace it.
    stop_pid kube-controller-manager "$(our_pid kube-controller-manager)"
  fi
  port_in_use "$KCM_PORT" &&
    die "port $KCM_PORT is taken by a process scripts/env did not start (set WARREN_CONTROLLER_MANAGER_PORT)"
  log "starting kube-controller-manager (all controllers) on 127.0.0.1:$KCM_PORT"
  spawn kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$KUBECONFIG_FILE" \
    --authentication-kubeconfig="$KUBECONFIG_FILE" --authorization-kubeconfig="$KUBECONFIG_FILE" \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --cert-dir="$STATE/kube-controller-manager" \
    --controllers='*' \
    --root-ca-file="$PKI/ca.crt" --service-account-private-key-file="$PKI/sa.key" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --leader-elect=false --node-monitor-grace-period=20s \
    --v=1
  touch "$STATE/kube-controller-manager.node"
  wait_for kube-controller-manager 60 kcm_healthy ||
    die "kube-controller-manager did not become healthy within 60s (see $STATE/kube-controller-manager.log)"
}

node_schedulable() {
  local out
  out=$(kubectl --kubeconfig "$KUBECONFIG_FILE" get node "$NODE_NAME" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status} {.spec.taints[*].key}' 2>/dev/null) || return 1
  [[ $out == True* && $out != *node.kubernetes.io/not-ready* ]]
}

# The kubelet evicts every pod when the disk's free space falls under evictionHard (1%, below): fail here with the
# reason rather than leave pods Evicted and a helm install --wait timing out.
node_disk_check() {
  local size_kb avail_kb need_kb
  read -r size_kb avail_kb < <(df -Pk "$STATE" | awk 'NR == 2 {print $2, $4}')
  need_kb=$(( size_kb / 100 + 2 * 1024 * 1024 ))
  (( avail_kb >= need_kb )) ||
    die "only $(( avail_kb / 1024 )) MiB free on $(df -P "$STATE" | awk 'NR == 2 {print $6}'); the node needs $(( need_kb / 1024 )) MiB (the kubelet evicts pods under 1% free, and images and pod logs need room): free some disk space"
}

node_up() {
  node_disk_check
  node_packages
  node_network_up
  pod_broker_user_up
  containerd_up
  node_images_up
  node_controller_manager_up
  scheduler_up
  kubelet_up
  wait_for "node $NODE_NAME Ready and schedulable" 120 node_schedulable ||
    die "node $NODE_NAME did not become Ready within 120s (see $STATE/kubelet.log)"
}

# --- down ---------------------------------------------------------------------------------------------------------

# Unmounts everything mounted under $1, deepest first.
unmount_under() {
  local dir=$1 mnt
  [[ -d $dir ]] || return 0
  awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
}

# Removes the cgroups the kubelet created (kubepods...) in every hierarchy, deepest first; their processes are gone.
remove_kubelet_cgroups() {
  local root dir
  for root in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/kubepods.slice /sys/fs/cgroup/kubepods; do
    [[ -d $root ]] || continue
    find "$root" -depth -type d 2>/dev/null | while read -r dir; do rmdir "$dir" 2>/dev/null || true; done
  done
}

# The Node object of a kubelet that no longer runs: the tests with local worker processes refuse to run while a
# node is registered.
forget_node() {
  apiserver_ready 2>/dev/null || return 0
  kubectl --kubeconfig "$KUBECONFIG_FILE" delete node "$NODE_NAME" --ignore-not-found --wait=false >/dev/null 2>&1 || true
}

node_down() {
  local pid
  if pid=$(our_pid kubelet); then stop_pid kubelet "$pid"; fi
  forget_node
  if pid=$(our_pid kube-scheduler); then stop_pid kube-scheduler "$pid"; fi
  if [[ -f $STATE/kube-controller-manager.node ]] && pid=$(our_pid kube-controller-manager); then
    stop_pid kube-controller-manager "$pid"
  fi
  rm -f "$STATE/kube-controller-manager.node"
  if containerd_ready; then
    # Every pod's containers, then containerd; the shims exit with their tasks.
    local id
    for id in $(ctr -a "$CONTAINERD_SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr -a "$CONTAINERD_SOCK" -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr -a "$CONTAINERD_SOCK" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr -a "$CONTAINERD_SOCK" -n k8s.io tasks delete -f "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr -a "$CONTAINERD_SOCK" -n k8s.io containers ls -q 2>/dev/null); do
      ctr -a "$CONTAINERD_SOCK" -n k8s.io containers delete "$id" >/dev/null 2>&1 || true
    done
  fi
  if pid=$(our_pid containerd); then stop_pid containerd "$pid"; fi
  # Shims of containers that outlived containerd (it was killed, say): their tasks go with them.
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $CONTAINERD_SOCK" 2>/dev/null || true
  # The pods' network namespaces: containerd pins them under /run/netns (cni-...); the veths die with them.
  local ns
  for ns in /run/netns/cni-*; do
    [[ -e $ns ]] || continue
    umount "$ns" 2>/dev/null || true
    rm -f "$ns"
  done
  unmount_under "$NODE_DIR"
  unmount_under "$CONTAINERD_ROOT"
  remove_kubelet_cgroups
  node_network_down
  rm -rf "$NODE_DIR"
}

node_status() {
  local pid
  if pid=$(our_pid containerd) && containerd_ready; then echo "containerd      running (pid $pid)  $CONTAINERD_SOCK"
  else echo "containerd      stopped"; return 3; fi
  if pid=$(our_pid kubelet) && kubelet_healthy; then echo "kubelet         running (pid $pid)  node $NODE_NAME, $NODE_IP"
  else echo "kubelet         stopped"; return 3; fi
  if pid=$(our_pid kube-scheduler) && scheduler_healthy; then echo "kube-scheduler  running (pid $pid)"
  else echo "kube-scheduler  stopped"; return 3; fi
}
