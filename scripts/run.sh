#!/usr/bin/env bash
# `make run`: a local Kafka broker (unless KAFKA_BOOTSTRAP_SERVERS points elsewhere), the
# topics, the gateway with a development API key, and the consumers on embedded defaults:
# warehouse (DuckDB in .data/warehouse.duckdb, its table its own dedupe store;
# WAREHOUSE_URL and DEDUPE_URL override them), alerts (config/alert-rules.example.toml to
# the log, or ALERT_RULES_FILE), and crm only when HUBSPOT_TOKEN is set. Everything in the
# foreground; Ctrl-C stops all.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
mkdir -p .data

started_kafka=""
if [ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then
  port=${KAFKA_PORT:-9092}
  scripts/kafka.sh start .data/kafka "$port"
  started_kafka=1
  export KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:$port"
fi

pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$started_kafka" ]; then scripts/kafka.sh stop .data/kafka; fi
  echo "run: stopped" >&2
}
trap cleanup INT TERM EXIT

"$bin/python" -m onoff_events.topics warehouse crm alerts

# A development key, made once and kept in .data (ignored by git), unless keys are given.
if [ -z "${GATEWAY_API_KEYS:-}" ]; then
  [ -s .data/dev-api-key ] || "$bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))' > .data/dev-api-key
  export GATEWAY_API_KEYS="dev:$(cat .data/dev-api-key)"
fi
export GATEWAY_PORT=${GATEWAY_PORT:-8080}
# The spool: a webhook Kafka cannot take within 2 s is fsynced here and answered 200, then
# replayed into Kafka (README, "Durability"). GATEWAY_SPOOL_DIR= (empty) turns it off.
export GATEWAY_SPOOL_DIR=${GATEWAY_SPOOL_DIR-.data/spool}
# Both webhooks: SMS (/v1/onoff/sms -> sms-events) and calls (/v1/onoff/cdr -> call-events).
export GATEWAY_EVENT_KINDS=${GATEWAY_EVENT_KINDS:-sms,call}
key=${GATEWAY_API_KEYS#*:}; key=${key%%,*}

cat >&2 <<MSG

run: the gateway listens on http://127.0.0.1:$GATEWAY_PORT  (Ctrl-C stops everything)
run: send Onoff's sample SMS event with:

curl -i http://127.0.0.1:$GATEWAY_PORT/v1/onoff/sms \\
  -H 'Authorization: x-api-key $key' -H 'Content-Type: application/json' \\
  -d '{"id":"12345","eventName":"SMS","onoffUserName":"John Doe","onoffUserEmail":"john.doe@example.com","onoffUserNumber":"1234567890","externalNumber":"0987654321","externalName":"John Smith","externalEmail":"smith@example.com","date":"2023-05-20T14:30:00Z","smsDirection":"SENT","body":"This is the body of the SMS"}'

run: and a sample call log (CDR) with:

curl -i http://127.0.0.1:$GATEWAY_PORT/v1/onoff/cdr \\
  -H 'Authorization: x-api-key $key' -H 'Content-Type: application/json' \\
  -d '{"id":"67890","eventName":"CDR","onoffUserName":"John Doe","onoffUserEmail":"john.doe@example.com","onoffUserNumber":"1234567890","externalNumber":"0987654321","externalName":"John Smith","externalEmail":"smith@example.com","callStarted":"2023-05-20T14:30:00Z","callEnded":"2023-05-20T14:32:05Z","callDuration":125,"callDirection":"INCOMING","callStatus":"ANSWERED","callNotes":null,"tags":[{"tagId":"t1","tagName":"Support","tagColor":"#2E86DE"}]}'

MSG

"$bin/python" -m gateway &
pids+=($!)
CONSUMER_PORT=8081 "$bin/python" -m consumers warehouse &
pids+=($!)
# Calls into onoff_calls: a service of their own (one per topic), with its own DuckDB file
# by default (.data/warehouse-calls.duckdb: one writer per file; with PostgreSQL both services
# share the database).
CONSUMER_PORT=8084 CONSUMER_EVENT_KIND=call "$bin/python" -m consumers warehouse &
pids+=($!)
CONSUMER_PORT=8082 ALERT_RULES_FILE=${ALERT_RULES_FILE:-config/alert-rules.example.toml} \
  "$bin/python" -m consumers alerts &
pids+=($!)
# The same rules file's call rules (missed_call, voicemail) on call-events.
CONSUMER_PORT=8085 CONSUMER_EVENT_KIND=call \
  ALERT_RULES_FILE=${ALERT_RULES_FILE:-config/alert-rules.example.toml} \
  "$bin/python" -m consumers alerts &
pids+=($!)
if [ -n "${HUBSPOT_TOKEN:-}" ]; then
  CONSUMER_PORT=8083 "$bin/python" -m consumers crm &
  pids+=($!)
  # Calls as HubSpot call engagements; its own dedupe file (one namespace per topic anyway).
  CONSUMER_PORT=8086 CONSUMER_EVENT_KIND=call \
    DEDUPE_URL=${DEDUPE_URL:-sqlite:///.data/dedupe-crm-calls.sqlite3} \
    "$bin/python" -m consumers crm &
  pids+=($!)
fi
echo "run: consumer metrics on http://127.0.0.1:8081/metrics (warehouse), :8084 (warehouse, calls), :8082 (alerts), :8085 (alerts, calls)${HUBSPOT_TOKEN:+, :8083 (crm), :8086 (crm, calls)}" >&2
# Wait for any service to end (Ctrl-C lands in the trap above).
wait -n "${pids[@]}" || true
