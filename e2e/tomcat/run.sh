#!/usr/bin/env bash
# Runs one Tomcat 10 (Debian's tomcat10) for the end-to-end tests and the
# bench, in a fresh CATALINA_BASE, with the test app as ROOT.
#
#   run.sh [MANAGER] [PROFILE] [RECEIVER_PORTS]
#     MANAGER         sessionmesh (default): the sessionmesh Manager, no <Cluster>
#                     standard: Tomcat's StandardManager (no clustering)
#                     delta-sync, delta-async: <Cluster> (SimpleTcpCluster) with
#                       DeltaManager and static membership, channelSendOptions
#                       6 (synchronous acks) or 8 (asynchronous)
#     PROFILE         test (default: quick start, C1 only) or bench (full JIT, 512 MB heap)
#     RECEIVER_PORTS  delta-*: every member's Tribes receiver port, p1,p2,p3 (node N gets pN)
#
# Environment (from the Stack): PORT, SIDECAR_HTTP, JVM_ROUTE, NODE_NAME,
# SESSIONMESH_APP_DIR (scratch space removed with the stack).
set -euo pipefail
manager="${1:-sessionmesh}"
profile="${2:-test}"
receivers="${3:-}"
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
home="${CATALINA_HOME:-/usr/share/tomcat10}"
jar="$root/adapters/tomcat/target/sessionmesh-tomcat-0.1.0.jar"
[ -f "$jar" ] || { echo "build the adapter first: bash e2e/tomcat/build.sh" >&2; exit 1; }
base="$(mktemp -d "${SESSIONMESH_APP_DIR:-${TMPDIR:-/tmp}}/tomcat-$NODE_NAME.XXXXXX")"
mkdir -p "$base"/{conf,logs,lib,temp,work,webapps}
cp "$home"/etc/{catalina.properties,logging.properties,web.xml} "$base/conf/" 2>/dev/null ||
  cp /etc/tomcat10/{catalina.properties,logging.properties,web.xml} "$base/conf/"
cp -r "$here/webapp" "$base/webapps/ROOT"
cp "$here/server.xml" "$base/conf/"
case "$manager" in
  sessionmesh)
    cp "$jar" "$base/lib/"
    cp "$here/context.xml" "$base/conf/" ;;
  standard)
    sed 's|<Manager .*/>|<Manager className="org.apache.catalina.session.StandardManager" pathname=""/>|' \
      "$here/context.xml" > "$base/conf/context.xml" ;;
  delta-sync|delta-async)
    [ -n "$receivers" ] || { echo "$manager needs the receiver ports: run.sh $manager $profile p1,p2,p3" >&2; exit 2; }
    options=6; [ "$manager" = delta-async ] && options=8
    me="${NODE_NAME//[!0-9]/}"
    members="" n=0 myport=""
    for p in ${receivers//,/ }; do
      n=$((n + 1))
      [ "$n" = "$me" ] && myport="$p"
      members+="          <Member className=\"org.apache.catalina.tribes.membership.StaticMember\" host=\"127.0.0.1\" port=\"$p\" uniqueId=\"{0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,$n}\"/>"$'\n'
    done
    [ -n "$myport" ] || { echo "no receiver port for $NODE_NAME in $receivers" >&2; exit 2; }
    # The context without a <Manager>: the <Cluster>'s DeltaManager applies (web.xml is <distributable/>).
    sed '/<Manager /d' "$here/context.xml" > "$base/conf/context.xml"
    cluster="$(sed -e "s|@OPTIONS@|$options|" -e "s|@PORT@|$myport|" "$here/cluster.xml")"
    members_file="$base/members.xml"; printf '%s' "$members" > "$members_file"
    cluster="$(printf '%s\n' "$cluster" | sed -e "/@MEMBERS@/{r $members_file" -e 'd}')"
    cluster_file="$base/cluster.xml"; printf '%s\n' "$cluster" > "$cluster_file"
    sed -i -e "/<!-- @CLUSTER@ -->/{r $cluster_file" -e 'd}' "$base/conf/server.xml" ;;
  *) echo "unknown manager $manager: sessionmesh, standard, delta-sync, delta-async" >&2; exit 2 ;;
esac
case "$profile" in
  test) jvm="-Xss512k -XX:+UseSerialGC -XX:TieredStopAtLevel=1" ;;
  bench) jvm="-Xms512m -Xmx512m -XX:+UseSerialGC" ;;
  *) echo "unknown profile $profile: test, bench" >&2; exit 2 ;;
esac
export CATALINA_BASE="$base" CATALINA_HOME="$home"
export CATALINA_OPTS="-Dport.http=$PORT -DjvmRoute=$JVM_ROUTE -Dsidecar=http://$SIDECAR_HTTP -Dnode=$NODE_NAME $jvm"
exec "$home/bin/catalina.sh" run
