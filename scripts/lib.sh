# Sourced by the experiment scripts (scripts/*.sh): their strict mode, their help text and the
# wall-time log each table reports.
set -euo pipefail

usage() {   # usage SCRIPT: prints the comment block at the top of SCRIPT (its help), then exits
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$1"
  exit 0
}

timed() {   # timed FILE FIELD... -- COMMAND...: runs COMMAND, then adds "FIELD<tab>...<tab>seconds"
  local file="$1" start=$SECONDS fields=()
  shift
  while [[ "$1" != -- ]]; do fields+=("$1"); shift; done
  shift
  "$@"
  local IFS=$'\t'
  printf '%s\t%s\n' "${fields[*]}" "$((SECONDS - start))" >> "$file"
}
