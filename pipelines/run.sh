#!/usr/bin/env bash
# Runs one of the launch-string files in this directory with gst-launch-1.0 -e: the same
# as `sdcrossframe run FILE VAR=value ...` without a progress display, for machines where
# only the plugin is installed.
#
#   pipelines/run.sh FILE.pipeline [VAR=value ...]
#
# Lines starting with # are comments. ${VAR} and ${VAR:-default} are replaced from the
# environment or the VAR=value arguments; a ${VAR} without a default that is not set is an
# error. Values are pasted in as they are: a value with spaces must sit inside the file's
# double quotes (as PROMPT does) and must not contain double quotes itself.
# The plugin is taken from target/release (else target/debug) unless GST_PLUGIN_PATH is set.
# GST_LAUNCH_OPTS adds gst-launch-1.0 options (e.g. -v, -m).
set -euo pipefail

if [ $# -lt 1 ]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
file=$1
shift
for assignment in "$@"; do
    case $assignment in
        *=*) export "${assignment%%=*}=${assignment#*=}" ;;
        *) echo "run.sh: expected VAR=value, got '$assignment'" >&2; exit 2 ;;
    esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${GST_PLUGIN_PATH:-}" ]; then
    if [ -e "$root/target/release/libgstsdcrossframe.so" ]; then
        export GST_PLUGIN_PATH="$root/target/release"
    else
        export GST_PLUGIN_PATH="$root/target/debug"
    fi
fi

launch=$(grep -v '^[[:space:]]*#' "$file" | perl -0777 -pe '
    s#\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^\}]*))?\}#
        (defined $ENV{$1} && $ENV{$1} ne "") ? $ENV{$1}
        : defined($2) ? $2
        : die("run.sh: variable $1 is not set (see the header of the pipeline file)\n")
    #ge;
    s/\s+/ /g;
')
echo "gst-launch-1.0 -e ${GST_LAUNCH_OPTS:-} $launch" >&2
set -f  # no globbing: the launch line is split into words only
exec gst-launch-1.0 -e ${GST_LAUNCH_OPTS:-} $launch
