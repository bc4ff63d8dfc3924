#!/bin/sh
# Write copies of the shipped rule files (alerts/*.rules.yml) with site- or test-specific
# changes. The shipped files are never edited; load the copies instead of them.
#
#   alerts/render.sh [--for DURATION] [--job NAME] OUT_DIR
#
#   --for DURATION  set every alert's `for:` to DURATION (e.g. 0s or 5s), so an end-to-end test
#                   sees alerts fire within seconds of their condition.
#   --job NAME      the Prometheus job that scrapes the exporter, if not `cpa-usage-exporter`
#                   (only CPAExporterDown names the job).
#
# Example: alerts/render.sh --for 0s /tmp/rules && promtool check rules /tmp/rules/*.yml
set -eu

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
}

for_value=
job=
out=
while [ $# -gt 0 ]; do
  case $1 in
    --for) [ $# -ge 2 ] || { usage >&2; exit 2; }; for_value=$2; shift 2 ;;
    --for=*) for_value=${1#--for=}; shift ;;
    --job) [ $# -ge 2 ] || { usage >&2; exit 2; }; job=$2; shift 2 ;;
    --job=*) job=${1#--job=}; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "render.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [ -z "$out" ] || { echo "render.sh: one output directory only" >&2; exit 2; }; out=$1; shift ;;
  esac
done
[ -n "$out" ] || { usage >&2; exit 2; }

if [ -n "$for_value" ] && ! printf '%s\n' "$for_value" | grep -Eq '^([0-9]+(ms|s|m|h|d))+$'; then
  echo "render.sh: --for wants a Prometheus duration such as 0s, 30s or 1m, not '$for_value'" >&2
  exit 2
fi
if [ -n "$job" ] && ! printf '%s\n' "$job" | grep -Eq '^[A-Za-z0-9_.:/-]+$'; then
  echo "render.sh: --job wants a plain job name (letters, digits, _ . : / -), not '$job'" >&2
  exit 2
fi

src=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
set --
[ -z "$for_value" ] || set -- "$@" -e "s/^\([[:space:]]*\)for: .*/\1for: $for_value/"
[ -z "$job" ] || set -- "$@" -e "s|job=\"cpa-usage-exporter\"|job=\"$job\"|g"
[ $# -gt 0 ] || set -- -e ''
for f in "$src"/*.rules.yml; do
  sed "$@" "$f" > "$out/$(basename "$f")"
done
