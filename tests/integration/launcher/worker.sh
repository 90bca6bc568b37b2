#!/bin/sh
# A test worker for `rally run`: reports its environment, then lives as long as the test asks.
#   FIRST_SECONDS  how long to run in the job's first generation (default 0.2)
#   LATER_SECONDS  how long in later generations (default 0.2)
#   FAIL_RANK      this global rank exits with FAIL_CODE (default 3): at restart 0 only, or at every
#                  restart with FAIL_ALWAYS=1
echo "worker rank=$RANK local=$LOCAL_RANK world=$WORLD_SIZE node=$GROUP_RANK nodes=$GROUP_WORLD_SIZE restart=$TORCHELASTIC_RESTART_COUNT gen=$RALLY_GENERATION master=$MASTER_ADDR:$MASTER_PORT pid=$$"
if [ "$RANK" = "${FAIL_RANK:--1}" ]; then
  if [ "${FAIL_ALWAYS:-0}" = 1 ] || [ "$TORCHELASTIC_RESTART_COUNT" = 0 ]; then
    echo "rank $RANK failing with ${FAIL_CODE:-3}" >&2
    exit "${FAIL_CODE:-3}"
  fi
fi
if [ "$RALLY_GENERATION" = 1 ]; then s=${FIRST_SECONDS:-0.2}; else s=${LATER_SECONDS:-0.2}; fi
exec sleep "$s"
