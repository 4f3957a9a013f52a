#!/usr/bin/env bash
# Installs every external part the tests use, on Debian 12 (or a close
# relative), and does nothing for what is already there. Each step says what it
# checks and what it installs; the first step that fails stops the script with
# a readable reason. Only a step that must install something needs root.
#
#   ./e2e/setup.sh          install what is missing
#   ./e2e/setup.sh --check  only report what is missing (exit 1 if anything is)
set -uo pipefail
cd "$(dirname "$0")/.."

check_only=0
[ "${1:-}" = "--check" ] && check_only=1

step() { printf '== %s\n' "$*"; }
fail() {
  printf 'setup: %s\n' "$*" >&2
  exit 1
}
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
missing_any=0

need_root() {
  if [ "$(id -u)" != 0 ]; then
    fail "$1 needs root (apt-get install). Run ./e2e/setup.sh as root once, or install it yourself: $2"
  fi
}

apt_updated=0
apt_install() {
  # apt_install WHAT PACKAGE...
  local what=$1
  shift
  if [ $check_only = 1 ]; then
    echo "   missing: $what (apt-get install $*)"
    missing_any=1
    return 0
  fi
  need_root "$what" "apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  if [ $apt_updated = 0 ]; then
    apt-get update -qq || fail "apt-get update failed (no network to the Debian mirror?)"
    apt_updated=1
  fi
  echo "   installing $what: apt-get install $*"
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null ||
    fail "apt-get install $* failed; run it by hand to see why"
}

step "programs from Debian: HAProxy, wrk, redis-server, redis-tools, etcd, openssl, faketime, curl"
pkgs=()
for pair in haproxy:haproxy wrk:wrk redis-server:redis-server redis-cli:redis-tools \
  redis-benchmark:redis-tools etcd:etcd-server openssl:openssl faketime:faketime curl:curl; do
  have "${pair%%:*}" || pkgs+=("${pair#*:}")
done
if [ ${#pkgs[@]} -gt 0 ]; then
  mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
  apt_install "${pkgs[*]}" "${pkgs[@]}"
fi

step "PHP with phpredis (a Redis client the endpoint is tested with)"
if ! have php || ! php -m 2>/dev/null | grep -qx redis; then
  apt_install "PHP and phpredis" php-cli php-redis
fi

step "Java 17, Maven (offline, Debian's repository) and Tomcat 10 (the Tomcat Manager and its tests)"
if ! have java || ! have mvn || [ ! -f /usr/share/tomcat10/bin/catalina.sh ] ||
  [ ! -d /usr/share/maven-repo/org/apache/tomcat/tomcat-catalina ] ||
  [ ! -d /usr/share/maven-repo/org/apache/maven/plugins/maven-jar-plugin/3.3.0 ] ||
  [ ! -d /usr/share/maven-repo/org/apache/maven/plugins/maven-surefire-plugin/2.22.3 ] ||
  [ ! -d /usr/share/maven-repo/junit/junit/4.13.2 ]; then
  apt_install "Java, Maven, JUnit 4 and Tomcat 10" default-jdk-headless maven libmaven-compiler-plugin-java \
    libmaven-jar-plugin-java libmaven-resources-plugin-java libsurefire-java junit4 libtomcat10-java tomcat10
fi
step "the Tomcat Manager (adapters/tomcat, Maven offline, with its JUnit tests)"
if [ "$check_only" = 1 ]; then
  [ -f adapters/tomcat/target/sessionmesh-tomcat-0.1.0.jar ] || echo "   missing: the adapter jar (built by this script)"
  [ -f e2e/tomcat/webapp/WEB-INF/classes/e2e/Events.class ] || echo "   missing: the Tomcat test app classes (built by this script)"
elif have mvn; then
  bash e2e/tomcat/build.sh ||
    fail "building adapters/tomcat or the test app failed; run: bash e2e/tomcat/build.sh"
fi

step "Go with Sprig (renders the Helm chart as Helm does)"
if ! have go || [ ! -d /usr/share/gocode/src/github.com/Masterminds/sprig ] ||
  [ ! -d /usr/share/gocode/src/gopkg.in/yaml.v2 ]; then
  apt_install "Go and Sprig" golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v2-dev
fi

step "Python 3 with redis-py, Flask, Flask-Session and Django"
if ! have python3 || ! python3 -m pip --version >/dev/null 2>&1; then
  apt_install "Python 3 and pip" python3 python3-pip
fi
if ! python3 -c 'import redis, flask, flask_session, django' >/dev/null 2>&1; then
  if [ $check_only = 1 ]; then
    echo "   missing: Python packages (pip install redis flask flask-session django)"
    missing_any=1
  else
    echo "   installing from PyPI: redis flask flask-session django"
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
      "redis>=8,<9" "flask>=3,<4" "flask-session>=0.8,<0.9" "django>=5,<6" ||
      python3 -m pip install -q --disable-pip-version-check --break-system-packages \
        "redis>=8,<9" "flask>=3,<4" "flask-session>=0.8,<0.9" "django>=5,<6" ||
      fail "pip install failed; run: python3 -m pip install redis flask flask-session django"
  fi
fi

step "Django's own test suite (its source distribution, for the cache tests against the Redis endpoint)"
django_version=$(python3 -c 'import django; print(django.__version__)' 2>/dev/null || true)
django_tests="${SESSIONMESH_CACHE:-$HOME/.cache/sessionmesh}/django-$django_version/tests"
if [ -n "$django_version" ] && [ ! -f "$django_tests/runtests.py" ]; then
  if [ $check_only = 1 ]; then
    echo "   missing: $django_tests (pip download django==$django_version --no-binary :all: --no-deps)"
    missing_any=1
  else
    echo "   downloading the sdist of Django $django_version from PyPI"
    tmp=$(mktemp -d)
    python3 -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
      -d "$tmp" "django==$django_version" ||
      fail "pip download of Django's sdist failed; run: pip download django==$django_version --no-binary :all: --no-deps"
    mkdir -p "$(dirname "$django_tests")"
    tar -xzf "$tmp"/django-*.tar.gz -C "$tmp" || fail "cannot unpack Django's sdist"
    rm -rf "$django_tests" && mv "$tmp/django-$django_version/tests" "$django_tests"
    rm -rf "$tmp"
  fi
fi

step "Node.js with express, express-session and connect-redis (e2e/node)"
if ! have node || ! have npm; then
  apt_install "Node.js and npm" nodejs npm
fi
if [ ! -d e2e/node/node_modules/connect-redis ] || [ ! -d e2e/node/node_modules/express-session ] ||
  [ ! -d e2e/node/node_modules/ioredis ]; then
  if [ $check_only = 1 ]; then
    echo "   missing: e2e/node/node_modules (cd e2e/node && npm install)"
    missing_any=1
  else
    echo "   installing from npm into e2e/node/node_modules"
    (cd e2e/node && npm install --no-package-lock --no-audit --no-fund --loglevel=error) ||
      fail "npm install in e2e/node failed"
  fi
fi

step "kube-apiserver (built once from Debian's source package, cached outside the repository)"
apiserver="${SESSIONMESH_KUBE_APISERVER:-${SESSIONMESH_CACHE:-$HOME/.cache/sessionmesh}/kube-apiserver-1.20.2}"
if [ ! -x "$apiserver" ]; then
  if [ $check_only = 1 ]; then
    echo "   missing: $apiserver (bash e2e/kube/build-apiserver.sh, about 5 minutes)"
    missing_any=1
  else
    need_root "building kube-apiserver" "bash e2e/kube/build-apiserver.sh"
    echo "   building it (about 5 minutes, once)"
    bash e2e/kube/build-apiserver.sh >/dev/null || fail "e2e/kube/build-apiserver.sh failed; run it by hand to see why"
  fi
fi

# Debian's packages start their own services; the tests start theirs on loopback.
if [ $check_only = 0 ] && [ "$(id -u)" = 0 ]; then
  for s in etcd haproxy redis-server; do
    (service "$s" stop) >/dev/null 2>&1 || true
  done
fi

if [ $check_only = 1 ] && [ $missing_any = 1 ]; then
  echo "setup: something is missing; ./e2e/setup.sh installs it" >&2
  exit 1
fi
step "everything the tests need is here"
