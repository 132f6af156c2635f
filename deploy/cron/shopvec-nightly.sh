#!/usr/bin/env bash
# cron wrapper for `shopvec nightly`: logs to a dated file, prints one line on failure (cron mails it),
# and exits with shopvec's exit code (0 published/no change, 1 stage failed, 2 bad config, 3 gate refused, 75 locked).
set -uo pipefail
SHOPVEC_HOME=${SHOPVEC_HOME:-/opt/shopvec}
SHOPVEC_CONFIG=${SHOPVEC_CONFIG:-$SHOPVEC_HOME/configs/nightly.toml}
LOG_DIR=${SHOPVEC_LOG_DIR:-/var/log/shopvec}
mkdir -p "$LOG_DIR"
log="$LOG_DIR/nightly-$(date -u +%F).log"
cd "$SHOPVEC_HOME" || { echo "shopvec-nightly: cannot cd to $SHOPVEC_HOME"; exit 1; }
echo "=== $(date -u +%FT%TZ) shopvec nightly --config $SHOPVEC_CONFIG" >>"$log"
"$SHOPVEC_HOME/.venv/bin/shopvec" nightly --config "$SHOPVEC_CONFIG" >>"$log" 2>&1
rc=$?
echo "=== $(date -u +%FT%TZ) exit $rc" >>"$log"
case $rc in
  0)  ;;                                                       # published or nothing to do: silent
  3)  echo "shopvec nightly: a quality gate refused the new index (CURRENT untouched); see $log" ;;
  75) echo "shopvec nightly: skipped, another run holds the lock; see $log" ;;
  *)  echo "shopvec nightly: FAILED with exit $rc; see $log" ;;
esac
find "$LOG_DIR" -name 'nightly-*.log' -mtime +30 -delete 2>/dev/null
exit $rc
