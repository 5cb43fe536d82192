# The environment's RabbitMQ, sourced by scripts/env: one node or a three-node cluster, RabbitMQ 4.0 (Debian trixie's,
# run with chroot from the tree scripts/build-rabbitmq caches) or 3.10 (bookworm's own package), all on loopback.
#
#   WARREN_RABBITMQ_VERSION=4.0 (default) | 3.10
#   WARREN_RABBITMQ_NODES=1 (default) | 3      nodes warren-1..N@localhost, joined into one cluster
#
# Node k listens on AMQP $AMQP_PORT+k-1, management $MGMT_PORT+k-1 and Erlang distribution 25672+k-1 (with the
# defaults: 5672/15672/25672, 5673/15673/25673, 5674/15674/25674). Each node runs as root from its own directory
# (config, cookie, data, wiped at every start: a test broker begins empty) and is stopped by `down`.
# `up` makes the running broker match the request: a broker scripts/env started with another version or node count
# is stopped and replaced; a broker someone else started is used as it is.

RABBITMQ_VERSION=${WARREN_RABBITMQ_VERSION:-4.0}
RABBITMQ_NODES=${WARREN_RABBITMQ_NODES:-1}
RABBITMQ_DIST_BASE=${WARREN_RABBITMQ_DIST_PORT:-25672}
RABBITMQ_STARTED=$STATE/rabbitmq.started   # "<version> <nodes> <tree or ->" of the broker scripts/env runs
RABBITMQ_TREE=   # the root the 4.x nodes run in (chroot); empty for bookworm's 3.10

management_answers() { curl -sf -m 2 -u guest:guest "http://127.0.0.1:$MGMT_PORT/api/overview" -o /dev/null; }

rabbitmq_want() { echo "$RABBITMQ_VERSION $RABBITMQ_NODES ${RABBITMQ_TREE:--}"; }

# The node's directory on the host, and the same directory as the node sees it (inside the tree for 4.x).
node_dir() { echo "${RABBITMQ_TREE}/var/lib/warren-env/warren-$1"; }
node_dir_inside() { echo "/var/lib/warren-env/warren-$1"; }

# Runs a RabbitMQ script ($2: rabbitmq-server, rabbitmqctl...) in node $1's environment, on the host or in the tree.
node_run() {
  local k=$1 script=$2; shift 2
  local dir; dir=$(node_dir_inside "$k")
  local env=(HOME="$dir" RABBITMQ_NODENAME="warren-$k@localhost" RABBITMQ_CONF_ENV_FILE=/dev/null ERL_EPMD_ADDRESS=127.0.0.1
    PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)
  # Only what the node needs is set; the caller's RABBITMQ_* settings (node_start's ports and paths) pass through.
  if [[ -n $RABBITMQ_TREE ]]; then
    env "${env[@]}" chroot "$RABBITMQ_TREE" "/usr/lib/rabbitmq/bin/$script" "$@" 8>&-   # epmd must not hold the env lock
  else
    env "${env[@]}" "/usr/lib/rabbitmq/bin/$script" "$@" 8>&-
  fi
}

rabbitmqctl_node() { local k=$1; shift; node_run "$k" rabbitmqctl -n "warren-$k@localhost" "$@"; }

# /proc and /dev inside the tree, which Erlang and the RabbitMQ scripts need.
tree_mounts_up() {
  [[ -n $RABBITMQ_TREE ]] || return 0
  mountpoint -q "$RABBITMQ_TREE/proc" || as_root mount -t proc proc "$RABBITMQ_TREE/proc"
  mountpoint -q "$RABBITMQ_TREE/dev" || as_root mount --rbind /dev "$RABBITMQ_TREE/dev"
}

tree_mounts_down() {
  local tree=$1
  [[ -n $tree && $tree != - ]] || return 0
  mountpoint -q "$tree/dev" && { as_root umount -R "$tree/dev" 2>/dev/null || as_root umount -lR "$tree/dev"; }
  mountpoint -q "$tree/proc" && { as_root umount "$tree/proc" 2>/dev/null || as_root umount -l "$tree/proc"; }
  return 0
}

node_start() {
  local k=$1 host_dir inside amqp=$(( AMQP_PORT + $1 - 1 )) mgmt=$(( MGMT_PORT + $1 - 1 )) dist=$(( RABBITMQ_DIST_BASE + $1 - 1 ))
  host_dir=$(node_dir "$k"); inside=$(node_dir_inside "$k")
  port_in_use "$amqp" && die "port $amqp (AMQP of node $k) is taken by a process scripts/env did not start"
  port_in_use "$dist" && die "port $dist (Erlang distribution of node $k) is taken: a node still runs there"
  as_root rm -rf "$host_dir"
  mkdir -p "$host_dir"/{mnesia,log}
  cat >"$host_dir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$amqp
management.tcp.ip = 127.0.0.1
management.tcp.port = $mgmt
# The tests fill the disk of a shared machine with nothing that matters: do not block publishers at 50 MB free.
disk_free_limit.absolute = 1MB
EOF
  echo '[rabbitmq_management].' >"$host_dir/enabled_plugins"
  # One cookie for all the nodes of the cluster (the distribution's shared secret), written once per start.
  cp "$STATE/rabbitmq.cookie" "$host_dir/.erlang.cookie"
  chmod 400 "$host_dir/.erlang.cookie"
  local extra=(RABBITMQ_NODE_PORT="$amqp" RABBITMQ_DIST_PORT="$dist" RABBITMQ_CONFIG_FILE="$inside/rabbitmq.conf"
    RABBITMQ_ENABLED_PLUGINS_FILE="$inside/enabled_plugins" RABBITMQ_MNESIA_BASE="$inside/mnesia"
    RABBITMQ_LOG_BASE="$inside/log" RABBITMQ_PID_FILE="$inside/pid"
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}")
  log "starting rabbitmq $RABBITMQ_VERSION node warren-$k@localhost (amqp $amqp, management $mgmt)"
  # node_run with the node's settings: setsid detaches it from this shell, as spawn does for the control plane.
  setsid env "${extra[@]}" bash -c "$(declare -f node_run node_dir_inside); RABBITMQ_TREE='$RABBITMQ_TREE'; node_run $k rabbitmq-server" \
    >>"$STATE/rabbitmq-$k.log" 2>&1 </dev/null 8>&- &
}

node_answers() {
  local k=$1
  curl -sf -m 2 -u guest:guest "http://127.0.0.1:$(( MGMT_PORT + k - 1 ))/api/overview" -o /dev/null
}

rabbitmq_resolve_tree() {
  case $RABBITMQ_VERSION in
    3.10) RABBITMQ_TREE= ;;
    4.0) RABBITMQ_TREE=$("$ROOT/scripts/build-rabbitmq") ;;
    *) die "WARREN_RABBITMQ_VERSION=$RABBITMQ_VERSION: supported are 4.0 (the default) and 3.10" ;;
  esac
  [[ $RABBITMQ_NODES == 1 || $RABBITMQ_NODES == 3 ]] || die "WARREN_RABBITMQ_NODES=$RABBITMQ_NODES: use 1 or 3"
}

rabbitmq_up() {
  rabbitmq_resolve_tree
  # A node whose app a test stopped answers neither the management API nor AMQP, yet its Erlang node (distribution
  # port) runs: it is still a running broker, not one to start (and wipe the directory of) under it.
  if management_answers || port_in_use "$AMQP_PORT" || port_in_use "$RABBITMQ_DIST_BASE"; then
    if [[ ! -f $RABBITMQ_STARTED ]]; then
      log "rabbitmq already running (not started by scripts/env; version and node count are not checked)"
      return 0
    fi
    if [[ $(<"$RABBITMQ_STARTED") == "$(rabbitmq_want)" ]]; then
      log "rabbitmq $RABBITMQ_VERSION already running ($RABBITMQ_NODES node(s))"
      return 0
    fi
    log "rabbitmq runs as '$(<"$RABBITMQ_STARTED")'; replacing it with '$(rabbitmq_want)'"
    rabbitmq_down
  fi
  [[ -n $RABBITMQ_TREE ]] || command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  tree_mounts_up
  [[ -s $STATE/rabbitmq.cookie ]] || (umask 077; openssl rand -hex 20 | tr a-f A-F >"$STATE/rabbitmq.cookie")
  local k
  for k in $(seq 1 "$RABBITMQ_NODES"); do node_start "$k"; done
  rabbitmq_want >"$RABBITMQ_STARTED"
  rabbitmqctl_wrapper
  RABBITMQ_STARTING=true   # the nodes boot (~10 s) while the control plane starts; rabbitmq_wait waits for them
}

rabbitmq_wait() {
  [[ ${RABBITMQ_STARTING:-} == true ]] || return 0
  local k
  for k in $(seq 1 "$RABBITMQ_NODES"); do
    wait_for "rabbitmq node warren-$k" 180 node_answers "$k" ||
      die "rabbitmq node warren-$k did not answer within 180s (see $STATE/rabbitmq-$k.log and $(node_dir "$k")/log)"
  done
  (( RABBITMQ_NODES > 1 )) || return 0
  for k in $(seq 2 "$RABBITMQ_NODES"); do
    log "joining warren-$k@localhost to warren-1@localhost"
    { rabbitmqctl_node "$k" stop_app && rabbitmqctl_node "$k" join_cluster warren-1@localhost &&
        rabbitmqctl_node "$k" start_app; } >>"$STATE/rabbitmq-$k.log" 2>&1 ||
      die "could not join warren-$k to the cluster (see $STATE/rabbitmq-$k.log)"
  done
  local running
  running=$(curl -sf -m 5 -u guest:guest "http://127.0.0.1:$MGMT_PORT/api/nodes" | jq '[.[] | select(.running)] | length')
  [[ $running == "$RABBITMQ_NODES" ]] || die "the cluster has $running running nodes, not $RABBITMQ_NODES"
  log "rabbitmq cluster of $RABBITMQ_NODES nodes running"
}

rabbitmq_down() {
  [[ -f $RABBITMQ_STARTED ]] || {
    management_answers && log "rabbitmq was not started by scripts/env; leaving it running"
    return 0
  }
  local version nodes tree k pids=() pid
  read -r version nodes tree <"$RABBITMQ_STARTED"
  [[ $tree == - ]] && tree=
  local RABBITMQ_TREE=$tree
  for k in $(seq 1 "$nodes"); do
    [[ -f $(node_dir "$k")/pid ]] && pids+=("$(<"$(node_dir "$k")/pid")")
  done
  # The nodes one at a time, bounded: a node still booting (or stuck) must not hold `down` forever.
  for k in $(seq "$nodes" -1 1); do
    timeout 60 bash -c "$(declare -f node_run node_dir_inside rabbitmqctl_node); RABBITMQ_TREE='$tree'; rabbitmqctl_node $k -q stop" \
      >/dev/null 2>&1 || log "stopping warren-$k failed or took over 60s"
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null || continue
    log "killing rabbitmq node pid $pid"
    as_root kill -KILL "$pid" || true
  done
  tree_mounts_down "$tree"
  rm -f "$RABBITMQ_STARTED"
  log "rabbitmq $version stopped ($nodes node(s))"
}

# What tests need to reach the nodes: every AMQP and management address, the tree, and a rabbitmqctl for node 1.
rabbitmq_exports() {
  local version=$RABBITMQ_VERSION nodes=$RABBITMQ_NODES tree=${RABBITMQ_TREE:--} k amqp=() mgmt=()
  [[ -f $RABBITMQ_STARTED ]] && read -r version nodes tree <"$RABBITMQ_STARTED"
  [[ $tree == - ]] && tree=
  for k in $(seq 1 "$nodes"); do amqp+=("127.0.0.1:$(( AMQP_PORT + k - 1 ))"); mgmt+=("127.0.0.1:$(( MGMT_PORT + k - 1 ))"); done
  local IFS=,
  echo "export WARREN_BROKER_URI='amqp://guest:guest@${amqp[*]}/%2f'"
  echo "export WARREN_MANAGEMENT_URI='http://guest:guest@${mgmt[*]}'"
  echo "export WARREN_RABBITMQ_VERSION=$version WARREN_RABBITMQ_NODES=$nodes WARREN_RABBITMQ_TREE='$tree'"
  [[ -f $RABBITMQ_STARTED ]] && echo "export WARREN_RABBITMQCTL='$STATE/rabbitmqctl'"
  return 0
}

# $STATE/rabbitmqctl: rabbitmqctl for node 1 of the broker scripts/env runs (tests stop and start its app with it).
rabbitmqctl_wrapper() {
  cat >"$STATE/rabbitmqctl" <<EOF
#!/usr/bin/env bash
# Written by scripts/env: rabbitmqctl against node warren-1 of the environment's RabbitMQ $RABBITMQ_VERSION.
$(declare -f node_run node_dir_inside rabbitmqctl_node)
RABBITMQ_TREE='$RABBITMQ_TREE'
rabbitmqctl_node 1 "\$@"
EOF
  chmod 755 "$STATE/rabbitmqctl"
}

rabbitmq_status() {
  if management_answers; then
    if [[ -f $RABBITMQ_STARTED ]]; then
      local version nodes tree
      read -r version nodes tree <"$RABBITMQ_STARTED"
      echo "rabbitmq        running $version, $nodes node(s) (started by scripts/env)  amqp://127.0.0.1:$AMQP_PORT  http://127.0.0.1:$MGMT_PORT"
    else
      echo "rabbitmq        running (not started by scripts/env) amqp://127.0.0.1:$AMQP_PORT  http://127.0.0.1:$MGMT_PORT"
    fi
  else
    echo "rabbitmq        stopped"
    return 3
  fi
}
