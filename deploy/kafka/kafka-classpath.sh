#!/usr/bin/env bash
# Print the Java classpath (colon-joined jar paths) of the Apache Kafka broker pinned in
# pom.xml beside this script, resolving the jars from Maven Central once into a cache folder.
#
#   deploy/kafka/kafka-classpath.sh            # -> /home/me/.cache/topology-store/kafka-4.4.0/a.jar:...
#   java -cp "$(deploy/kafka/kafka-classpath.sh)" kafka.Kafka server.properties
#   deploy/kafka/kafka-classpath.sh --cached   # only from the cache: exit 3 if it is not complete
#
# Environment:
#   TOPOLOGY_KAFKA_CACHE    the cache folder (default ~/.cache/topology-store/kafka-<version>)
#   TOPOLOGY_KAFKA_VERSION  resolve another Kafka version than the pinned one (for trying
#                           upgrades only: the pinned one is the one checked against aiokafka)
#
# The first run needs Maven (mvn) and Java; later runs only read the cache (no mvn call).
# Only the classpath goes to stdout; progress and errors go to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
pom="$here/pom.xml"

die() { echo "kafka-classpath.sh: $*" >&2; exit 1; }

cached_only=false
case "${1:-}" in
  "") ;;
  --cached) cached_only=true ;;
  *) die "usage: kafka-classpath.sh [--cached]" ;;
esac

[[ -f "$pom" ]] || die "missing $pom"
command -v java >/dev/null 2>&1 \
  || die "java not found on PATH: the Kafka 4.x broker needs a Java 17+ runtime (e.g. apt-get install openjdk-17-jre-headless)"

pinned="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom" | head -n1)"
[[ -n "$pinned" ]] || die "no <kafka.version> in $pom"
version="${TOPOLOGY_KAFKA_VERSION:-$pinned}"
cache="${TOPOLOGY_KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/topology-store/kafka-$version}"
[[ "$cache" == /* ]] || cache="$PWD/$cache"
cache="${cache%/}"
marker="$cache/.complete"

# The cache is complete when its marker names this POM (and version) and every jar it lists exists.
pom_sum="$( (cat "$pom"; echo "version=$version") | sha256sum | cut -d' ' -f1)"

print_if_complete() {
  [[ -f "$marker" ]] || return 1
  local first jar cp=""
  { IFS= read -r first || true; } <"$marker"
  [[ "$first" == "pom-sha256=$pom_sum" ]] || return 1
  while IFS= read -r jar; do
    [[ -f "$cache/$jar" ]] || return 1
    cp+="${cp:+:}$cache/$jar"
  done < <(tail -n +2 "$marker")
  [[ -n "$cp" ]] || return 1
  printf '%s\n' "$cp"
}

print_if_complete && exit 0
$cached_only && { echo "kafka-classpath.sh: no complete jar cache in $cache" >&2; exit 3; }

command -v mvn >/dev/null 2>&1 \
  || die "mvn not found on PATH: it is needed once to fetch the Kafka jars into $cache (e.g. apt-get install maven)"

mkdir -p "$(dirname "$cache")"
# One resolver at a time (parallel test workers on a cold cache); the loser then finds it complete.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$cache.lock"
  flock 9
  print_if_complete && exit 0
fi

# Replace an outdated cache (another POM) or an empty folder, never a folder that is not ours.
if [[ -e "$cache" && ! -f "$marker" ]] && ! [[ -d "$cache" && -z "$(ls -A "$cache")" ]]; then
  die "$cache exists and is not a kafka-classpath.sh cache: remove it or set TOPOLOGY_KAFKA_CACHE"
fi

echo "kafka-classpath.sh: fetching Apache Kafka $version jars into $cache (once)..." >&2
staging="$(mktemp -d "$cache.partial.XXXXXX")"
trap 'rm -rf "$staging"' EXIT
mvn_log="$staging/.mvn.log"
if ! mvn -q -B -Dstyle.color=never -f "$pom" -Dkafka.version="$version" \
    dependency:copy-dependencies -DoutputDirectory="$staging" -DincludeScope=runtime \
    >"$mvn_log" 2>&1; then
  cat "$mvn_log" >&2
  die "mvn could not resolve org.apache.kafka:kafka_2.13:$version (log above)"
fi
rm -f "$mvn_log"

{
  echo "pom-sha256=$pom_sum"
  find "$staging" -maxdepth 1 -name '*.jar' -printf '%f\n' | LC_ALL=C sort
} >"$staging/.complete"
[[ "$(wc -l <"$staging/.complete")" -gt 1 ]] || die "mvn copied no jars into $staging"

rm -rf "$cache"  # an outdated cache of ours (checked above), or an empty folder
mv "$staging" "$cache"
trap - EXIT
print_if_complete || die "cache $cache incomplete right after resolving it"
