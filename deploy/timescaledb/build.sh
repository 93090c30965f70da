#!/usr/bin/env bash
# Build TimescaleDB from a source tree you already have and install it into a private copy of
# this machine's PostgreSQL 15, never into the system PostgreSQL.
#
#   deploy/timescaledb/build.sh SOURCE_DIR [PREFIX]
#
# SOURCE_DIR  a TimescaleDB 2.28.x checkout (2.28 is the last line that supports PostgreSQL 15).
# PREFIX      where the private PostgreSQL goes (default: ~/.cache/vigil/pg15-timescaledb).
#
# The script downloads nothing: it needs the source tree, cmake, a C compiler and the PostgreSQL 15
# server headers (Debian: postgresql-server-dev-15, the same minor version as postgresql-15).
# PREFIX gets the Debian layout (PREFIX/usr/lib/postgresql/15/{bin,lib},
# PREFIX/usr/share/postgresql/15), copied from the system's; PostgreSQL finds its lib and share
# directories relative to its own binary, so the copied server loads the TimescaleDB installed
# beside it and the system's PostgreSQL stays without it. The last line printed is the bin dir:
#
#   VIGIL_STACK_PG_BIN_DIR=PREFIX/usr/lib/postgresql/15/bin make test-timescale
set -euo pipefail

usage() { echo "usage: $0 SOURCE_DIR [PREFIX]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage

SRC=$(cd "$1" && pwd)
PREFIX=${2:-$HOME/.cache/vigil/pg15-timescaledb}
SYSTEM_BIN=${VIGIL_SYSTEM_PG_BIN_DIR:-/usr/lib/postgresql/15/bin}
JOBS=${JOBS:-2}

[[ -f "$SRC/version.config" && -f "$SRC/CMakeLists.txt" ]] \
    || { echo "$SRC is not a TimescaleDB source tree (no version.config)" >&2; exit 1; }
version=$(sed -n 's/^version = //p' "$SRC/version.config")
case "$version" in
    2.28.*) ;;
    *) echo "TimescaleDB $version: this project needs 2.28.x (PostgreSQL 15)" >&2; exit 1 ;;
esac

sys_libdir=$("$SYSTEM_BIN/pg_config" --pkglibdir)
sys_sharedir=$("$SYSTEM_BIN/pg_config" --sharedir)
sys_bindir=$("$SYSTEM_BIN/pg_config" --bindir)
sys_includedir=$("$SYSTEM_BIN/pg_config" --pkgincludedir)
[[ -f "$("$SYSTEM_BIN/pg_config" --includedir-server)/postgres.h" ]] \
    || { echo "no PostgreSQL server headers; install postgresql-server-dev-15" >&2; exit 1; }

PREFIX=$(realpath -m "$PREFIX")
case "$PREFIX" in
    /|/usr|/usr/*|/opt|/etc|/var|/var/*)
        echo "refusing to install into $PREFIX: the system PostgreSQL must stay plain" >&2; exit 1 ;;
esac
mkdir -p "$PREFIX"

# The private PostgreSQL: the system's binaries, libraries and share files at the same relative
# places under PREFIX (copied, not linked: PostgreSQL resolves links to find its own location).
# A tree made by an earlier run is refreshed the same way, keeping what was installed into it.
bin="$PREFIX$sys_bindir"
lib="$PREFIX$sys_libdir"
share="$PREFIX$sys_sharedir"
mkdir -p "$bin" "$lib" "$share"
cp -a "$sys_bindir/." "$bin/"
cp -a "$sys_libdir/." "$lib/"
cp -a "$sys_sharedir/." "$share/"
# The headers are only read by the build: a link to the system's is enough.
mkdir -p "$(dirname "$PREFIX$sys_includedir")"
ln -sfn "$sys_includedir" "$PREFIX$sys_includedir"
[[ "$("$bin/pg_config" --pkglibdir)" == "$lib" ]] \
    || { echo "the copied pg_config does not find $lib; the layout is not relocatable" >&2; exit 1; }

build="$PREFIX/build/timescaledb-$version"
rm -rf "$build"
mkdir -p "$build"
cmake -S "$SRC" -B "$build" \
    -DPG_CONFIG="$bin/pg_config" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DWARNINGS_AS_ERRORS=OFF \
    -DLINTER=OFF -DSEND_TELEMETRY_DEFAULT=OFF -DUSE_TELEMETRY=OFF
cmake --build "$build" -j "$JOBS"
cmake --install "$build"

[[ -f "$lib/timescaledb.so" && -f "$share/extension/timescaledb.control" ]] \
    || { echo "the install did not put timescaledb into $PREFIX" >&2; exit 1; }
if [[ -e "$sys_libdir/timescaledb.so" ]]; then
    echo "warning: the system PostgreSQL ($sys_libdir) has its own timescaledb.so" >&2
fi
# PostgreSQL 15.20 refuses to drop a portal that was never started, which TimescaleDB 2.28's job
# runner does after every background job: the jobs do their work, then fail (docs/storage.md).
if grep -q "while it is being set up" "$bin/postgres"; then
    echo "warning: this PostgreSQL ($("$bin/postgres" --version)) fails TimescaleDB's background" \
        "jobs at their end (cannot drop portal); see docs/storage.md" >&2
fi
echo "TimescaleDB $version installed into the PostgreSQL at $bin" >&2
echo "$bin"
