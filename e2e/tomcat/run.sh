#!/usr/bin/env bash
# Runs one Tomcat 10 (Debian's tomcat10) for the end-to-end tests, in a fresh
# CATALINA_BASE under $TMPDIR, with the sessionmesh Manager and the test app.
# Environment (from the test's Stack): PORT, SIDECAR_HTTP, JVM_ROUTE, NODE_NAME,
# SESSIONMESH_APP_DIR (scratch space removed with the stack).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
home="${CATALINA_HOME:-/usr/share/tomcat10}"
jar="$root/adapters/tomcat/target/sessionmesh-tomcat-0.1.0.jar"
[ -f "$jar" ] || { echo "build the adapter first: (cd adapters/tomcat && mvn -o -Dmaven.repo.local=/usr/share/maven-repo package)" >&2; exit 1; }
base="$(mktemp -d "${SESSIONMESH_APP_DIR:-${TMPDIR:-/tmp}}/tomcat-$NODE_NAME.XXXXXX")"
mkdir -p "$base"/{conf,logs,lib,temp,work,webapps}
cp "$home"/etc/{catalina.properties,logging.properties,web.xml} "$base/conf/" 2>/dev/null ||
  cp /etc/tomcat10/{catalina.properties,logging.properties,web.xml} "$base/conf/"
cp "$jar" "$base/lib/"
cp "$here/server.xml" "$here/context.xml" "$base/conf/"
cp -r "$here/webapp" "$base/webapps/ROOT"
export CATALINA_BASE="$base" CATALINA_HOME="$home"
export CATALINA_OPTS="-Dport.http=$PORT -DjvmRoute=$JVM_ROUTE -Dsidecar=http://$SIDECAR_HTTP -Dnode=$NODE_NAME -Xss512k -XX:+UseSerialGC -XX:TieredStopAtLevel=1"
exec "$home/bin/catalina.sh" run
