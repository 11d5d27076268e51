#!/usr/bin/env bash
# A real single-node Apache Kafka (KRaft, combined broker+controller) on 127.0.0.1, no Docker.
#
#   scripts/kafka.sh fetch                 resolve the jars from Maven Central (cached)
#   scripts/kafka.sh start  [DIR] [PORT]   format storage if new, start, wait until it serves metadata
#   scripts/kafka.sh stop   [DIR]          stop, leave no process behind
#   scripts/kafka.sh status [DIR]
#   scripts/kafka.sh run    [DIR] [PORT]   foreground (Ctrl-C stops it)
#   scripts/kafka.sh class  CLASS ARGS...  run any class from the Kafka jars (tools, perf tests)
#
# DIR defaults to .data/kafka, PORT to $KAFKA_PORT or 9092; the controller listens on PORT+1.
# KAFKA_VERSION (default below) picks the release; KAFKA_HEAP_OPTS the JVM heap.
# KAFKA_PROXIED_PORT and KAFKA_PROXIED_ADVERTISED_PORT (both or neither, at start/run) add a
# listener PROXIED on the first port that advertises the second, a fault proxy's (toxiproxy)
# in front of it: clients bootstrapped there keep talking through the proxy.
# KAFKA_SASL_SSL_PORT and KAFKA_SECURE_DIR (both or neither, at start/run) add the production
# security path: a listener SASL_SSL (SCRAM-SHA-512 over TLS) on that port, and KRaft's
# StandardAuthorizer (no ACL, no access). The secure DIR holds broker.p12 (the broker's PKCS12
# keystore: key and certificate for 127.0.0.1), broker.password (its password) and
# scram-users ("name password" a line, [A-Za-z0-9._-] only): SCRAM-SHA-512 credentials written
# when the storage is formatted; later ones: kafka.sh class kafka.admin.ConfigCommand.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
version=${KAFKA_VERSION:-4.3.1}
log4j_version=2.24.3
cache="$root/.cache/kafka/$version"
libs="$cache/libs"

die() { echo "kafka.sh: $*" >&2; exit 1; }

fetch() {
  [ -f "$libs/.complete" ] && return 0
  if ! command -v mvn >/dev/null || ! command -v java >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "kafka.sh: installing Java 17 and Maven from Debian's packages" >&2
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
    fi
    command -v mvn >/dev/null || die "Maven (mvn) is needed to resolve Kafka's jars; apt-get install maven"
    command -v java >/dev/null || die "Java 17+ is needed to run Kafka; apt-get install openjdk-17-jre-headless"
  fi
  mkdir -p "$cache"
  # kafka-tools brings the perf and admin tools (ProducerPerformance, BrokerApiVersionsCommand);
  # log4j-slf4j-impl binds the slf4j 1.7 API that Kafka's jars use, so the broker actually logs.
  cat >"$cache/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.onoff-events</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$version</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$version</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$log4j_version</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$log4j_version</version></dependency>
  </dependencies>
</project>
POM
  echo "kafka.sh: resolving Apache Kafka $version from Maven Central into $libs" >&2
  rm -rf "$libs.tmp"
  mvn -q -B -f "$cache/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$libs.tmp" -DincludeScope=runtime >&2 \
    || die "mvn could not resolve org.apache.kafka:kafka_2.13:$version"
  # Two slf4j bindings on one classpath make slf4j pick one at random; keep ours only.
  rm -f "$libs.tmp"/slf4j-reload4j-*.jar "$libs.tmp"/log4j-slf4j2-impl-*.jar
  rm -rf "$libs"; mv "$libs.tmp" "$libs"; touch "$libs/.complete"
}

java_args() {  # java_args LOG4J_CONFIG: the JVM's own options, one a line
  # shellcheck disable=SC2086 # KAFKA_HEAP_OPTS holds several options on purpose
  printf '%s\n' ${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m} -XX:+UseG1GC -Djava.awt.headless=true \
    "-Dlog4j2.configurationFile=$1" -cp "$libs/*"
}

write_log_configs() {
  # The broker logs INFO to its log file; tools (console consumer, perf tests) only warn,
  # on stderr, so their own output stays readable.
  for level in INFO WARN; do
    cat >"$cache/log4j2-$level.properties" <<L4J
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.target = SYSTEM_ERR
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = $level
rootLogger.appenderRef.out.ref = OUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
L4J
  done
}

java_run() {  # java_run CLASS ARGS...  (a tool: warnings only)
  local opts; mapfile -t opts < <(java_args "$cache/log4j2-WARN.properties")
  java "${opts[@]}" "$@"
}

proxied_listener() {  # proxied_listener PORT CPORT: checks KAFKA_PROXIED_*; sets proxied_port, proxied_adv
  proxied_port=${KAFKA_PROXIED_PORT:-} proxied_adv=${KAFKA_PROXIED_ADVERTISED_PORT:-}
  [ -z "$proxied_port$proxied_adv" ] && return 0
  [[ $proxied_port =~ ^[0-9]+$ && $proxied_adv =~ ^[0-9]+$ ]] \
    || die "KAFKA_PROXIED_PORT and KAFKA_PROXIED_ADVERTISED_PORT: set both to port numbers, or neither"
  [ "$proxied_port" != "$1" ] && [ "$proxied_port" != "$2" ] \
    || die "KAFKA_PROXIED_PORT=$proxied_port is the broker's or the controller's port"
}

secure_listener() {  # secure_listener PORT CPORT: checks KAFKA_SASL_SSL_PORT/KAFKA_SECURE_DIR; sets sasl_port, secure
  sasl_port=${KAFKA_SASL_SSL_PORT:-} secure=${KAFKA_SECURE_DIR:-}
  [ -z "$sasl_port$secure" ] && return 0
  [[ $sasl_port =~ ^[0-9]+$ && -n $secure ]] \
    || die "KAFKA_SASL_SSL_PORT and KAFKA_SECURE_DIR: set both (a port number, a folder), or neither"
  [ "$sasl_port" != "$1" ] && [ "$sasl_port" != "$2" ] \
    || die "KAFKA_SASL_SSL_PORT=$sasl_port is the broker's or the controller's port"
  secure=$(cd "$secure" 2>/dev/null && pwd) || die "KAFKA_SECURE_DIR=$KAFKA_SECURE_DIR: no such folder"
  local file
  for file in broker.p12 broker.password scram-users; do
    [ -f "$secure/$file" ] || die "KAFKA_SECURE_DIR: $secure/$file is missing"
  done
}

write_config() {  # write_config DIR PORT
  local dir=$1 port=$2 cport=$(( $2 + 1 )) proxied_port proxied_adv sasl_port secure
  local listeners="PLAINTEXT://127.0.0.1:$port" advertised="PLAINTEXT://127.0.0.1:$port" map=""
  proxied_listener "$port" "$cport"
  if [ -n "$proxied_port" ]; then
    listeners+=",PROXIED://127.0.0.1:$proxied_port"
    advertised+=",PROXIED://127.0.0.1:$proxied_adv"
    map=",PROXIED:PLAINTEXT"
  fi
  secure_listener "$port" "$cport"
  if [ -n "$sasl_port" ]; then
    listeners+=",SASL_SSL://127.0.0.1:$sasl_port"
    advertised+=",SASL_SSL://127.0.0.1:$sasl_port"
    map+=",SASL_SSL:SASL_SSL"
  fi
  mkdir -p "$dir/data"
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=$listeners,CONTROLLER://127.0.0.1:$cport
advertised.listeners=$advertised
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT$map
log.dirs=$dir/data
num.partitions=3
# Topics are created on purpose (scripts, tests, Strimzi in production), never by a typo.
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=24
# GATEWAY_MAX_BODY_BYTES may be 8 MiB, and a body that is not JSON goes to the DLQ as base64
# (4 bytes for 3) inside a JSON record: 11 MiB covers both; Kafka's default is 1 MiB.
message.max.bytes=11534336
PROPS
  [ -z "$sasl_port" ] || cat >>"$dir/server.properties" <<PROPS
# KAFKA_SASL_SSL_PORT: the production security path. Services authenticate with SCRAM-SHA-512
# over TLS on the SASL_SSL listener and get only what their ACLs allow.
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PKCS12
listener.name.sasl_ssl.ssl.keystore.location=$secure/broker.p12
listener.name.sasl_ssl.ssl.keystore.password=$(head -n 1 "$secure/broker.password")
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
# User:admin is the operator over SASL_SSL. User:ANONYMOUS is whoever comes in over the
# PLAINTEXT listeners on 127.0.0.1: the broker itself (inter-broker and controller traffic
# use them, and the controller authorizes the broker's own requests) and local tooling
# (topics, ACLs, SCRAM changes). Clients meant to be checked must use the SASL_SSL port.
super.users=User:admin;User:ANONYMOUS
PROPS
  write_log_configs
}

format_storage() {  # format_storage DIR
  local dir=$1
  [ -f "$dir/data/meta.properties" ] && return 0
  local cluster_id scram=() name password
  cluster_id=$(java_run kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
  if [ -n "${KAFKA_SASL_SSL_PORT:-}" ]; then  # both checked by write_config
    while read -r name password _; do
      [ -z "$name" ] && continue
      [[ $name$password =~ ^[A-Za-z0-9._-]+$ && -n $password ]] \
        || die "scram-users: expected 'name password' of [A-Za-z0-9._-], got a line for '$name'"
      scram+=(--add-scram "SCRAM-SHA-512=[name=$name,password=$password]")
    done <"${KAFKA_SECURE_DIR%/}/scram-users"
  fi
  java_run kafka.tools.StorageTool format --standalone -t "$cluster_id" \
    -c "$dir/server.properties" "${scram[@]}" >>"$dir/kafka.log" 2>&1 \
    || die "formatting KRaft storage failed; see $dir/kafka.log"
}

pid_of() {  # prints the pid if the broker of DIR runs
  local dir=$1
  [ -f "$dir/kafka.pid" ] || return 1
  local pid; pid=$(cat "$dir/kafka.pid")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

# ApiVersions v0 is answered by every broker version; a broker answers only once its
# socket server is up, and we also wait for the server's own "started" line below.
probe() {  # probe PORT -> exit 0 if a Kafka broker answers ApiVersions on 127.0.0.1:PORT
  python3 - "$1" <<'PY'
import socket, struct, sys
port = int(sys.argv[1])
try:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.settimeout(2)
        client = b"probe"
        body = struct.pack(">hhih", 18, 0, 7, len(client)) + client
        s.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", s.recv(4, socket.MSG_WAITALL))[0]
        payload = s.recv(size, socket.MSG_WAITALL)
        corr, err = struct.unpack(">ih", payload[:6])
        sys.exit(0 if corr == 7 and err == 0 else 1)
except (OSError, struct.error):
    sys.exit(1)
PY
}

start() {
  local dir=${1:-$root/.data/kafka} port=${2:-${KAFKA_PORT:-9092}}
  fetch
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  if pid=$(pid_of "$dir"); then
    echo "kafka.sh: already running (pid $pid) in $dir" >&2; return 0
  fi
  write_config "$dir" "$port"
  format_storage "$dir"
    local opts; mapfile -t opts < <(java_args "$cache/log4j2-INFO.properties")
  # setsid: a Ctrl-C in the terminal reaches our scripts, which stop the broker in order.
  setsid java "${opts[@]}" kafka.Kafka "$dir/server.properties" >>"$dir/kafka.log" 2>&1 </dev/null &
  echo $! >"$dir/kafka.pid"
  local deadline=$(( SECONDS + ${KAFKA_START_TIMEOUT:-90} ))
  until probe "$port" && grep -q "Kafka Server started" "$dir/kafka.log"; do
    if ! pid_of "$dir" >/dev/null; then
      tail -n 30 "$dir/kafka.log" >&2; die "broker exited during start-up; log: $dir/kafka.log"
    fi
    [ $SECONDS -lt $deadline ] || { stop "$dir"; die "broker did not answer on 127.0.0.1:$port in time; log: $dir/kafka.log"; }
    sleep 0.5
  done
  echo "kafka.sh: Kafka $version ready on 127.0.0.1:$port (pid $(cat "$dir/kafka.pid"), log $dir/kafka.log)" >&2
}

stop() {
  local dir=${1:-$root/.data/kafka} pid
  [ -d "$dir" ] || return 0
  if pid=$(pid_of "$dir"); then
    kill -TERM "$pid" 2>/dev/null || true
    # A controlled shutdown takes a few seconds; past 30 s the broker is killed.
    for _ in $(seq 1 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/kafka.pid"
}

case "${1:-}" in
  fetch) fetch ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  status) dir=${2:-$root/.data/kafka}; if pid=$(pid_of "$dir"); then echo "running (pid $pid)"; else echo "stopped"; exit 3; fi ;;
  run) shift; dir=${1:-$root/.data/kafka}; port=${2:-${KAFKA_PORT:-9092}}; fetch; mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
       write_config "$dir" "$port"; format_storage "$dir"
       mapfile -t opts < <(java_args "$cache/log4j2-INFO.properties")
       exec java "${opts[@]}" kafka.Kafka "$dir/server.properties" ;;
  class) shift; fetch; write_log_configs; java_run "$@" ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
