#!/usr/bin/env bash
# Builds what the Tomcat end-to-end tests run: the Manager jar (Maven offline,
# with its JUnit tests) and the test app's listener classes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
(cd "$root/adapters/tomcat" && mvn -B -o -q -Dmaven.repo.local=/usr/share/maven-repo package)
home="${CATALINA_HOME:-/usr/share/tomcat10}"
classes="$here/webapp/WEB-INF/classes"
rm -rf "$classes" && mkdir -p "$classes"
javac --release 17 -nowarn -cp "$home/lib/servlet-api.jar" -d "$classes" "$here"/src/e2e/*.java
