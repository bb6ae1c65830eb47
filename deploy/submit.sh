#!/usr/bin/env bash
# Submit `raylhf train CONFIG` to a running Ray cluster as a Ray job, then print how to follow and fetch it.
#
#   RAY_ADDRESS=http://localhost:8265 deploy/submit.sh my_job.yaml [--set KEY=VALUE ...]
#
# The working directory (WORKING_DIR, default: the current one) is uploaded with the job: CONFIG must be inside
# it, and reward files in it can be named by relative paths ("my_rewards.py:fn"); every worker runs in its own
# node's copy. Keep it small (runs/, checkpoints/, .venv/ and .git/ are left out).
#
# Environment:
#   RAY_ADDRESS     the cluster's dashboard URL (required), e.g. http://localhost:8265 after `ray dashboard`
#   WORKING_DIR     directory to upload (default: .)
#   SUBMISSION_ID   job id (default: raylhf-<time>)
#   RUN_DIR         where the run writes on the cluster (default: /shared/runs/<SUBMISSION_ID>); a path every
#                   node shares, so the results outlive the job's temporary working directory
#   FOLLOW=1        follow the logs right away (Ctrl-C stops following, not the job)
# Token authentication (RAY_AUTH_MODE=token): the token is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
# ~/.ray/auth_token, as by any Ray client.
set -euo pipefail

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 && "$1" != -* ]] || usage
CONFIG="$1"; shift

: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster dashboard URL, e.g. http://localhost:8265 (ray dashboard deploy/cluster.yaml forwards it there)}"
WORKING_DIR="${WORKING_DIR:-.}"
SUBMISSION_ID="${SUBMISSION_ID:-raylhf-$(date +%Y%m%d-%H%M%S)}"
RUN_DIR="${RUN_DIR:-/shared/runs/$SUBMISSION_ID}"

[[ -f "$CONFIG" ]] || { echo "submit.sh: config $CONFIG not found" >&2; exit 2; }
[[ -d "$WORKING_DIR" ]] || { echo "submit.sh: working dir $WORKING_DIR not found" >&2; exit 2; }
# The driver runs inside the uploaded copy of WORKING_DIR, so the config is named relative to it.
CONFIG_IN_JOB="$(python3 -c 'import os, sys; print(os.path.relpath(os.path.realpath(sys.argv[1]), os.path.realpath(sys.argv[2])))' "$CONFIG" "$WORKING_DIR")"
[[ "$CONFIG_IN_JOB" != ../* ]] || { echo "submit.sh: $CONFIG is outside the working dir $WORKING_DIR, which is all the job receives" >&2; exit 2; }
if [[ "${RAY_AUTH_MODE:-}" == token && -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$HOME/.ray/auth_token" ]]; then
  echo "submit.sh: RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or copy the cluster's token to ~/.ray/auth_token" >&2
  exit 2
fi

ray job submit \
  --address "$RAY_ADDRESS" \
  --submission-id "$SUBMISSION_ID" \
  --working-dir "$WORKING_DIR" \
  --runtime-env-json '{"excludes": ["runs/", "checkpoints/", ".venv/", ".git/", "__pycache__/"]}' \
  --no-wait \
  -- raylhf train "$CONFIG_IN_JOB" --run-dir "$RUN_DIR" "$@"

cat <<EOF

Submitted $SUBMISSION_ID to $RAY_ADDRESS.
  follow the logs   ray job logs --address $RAY_ADDRESS --follow $SUBMISSION_ID
  status            ray job status --address $RAY_ADDRESS $SUBMISSION_ID
  stop it           ray job stop --address $RAY_ADDRESS $SUBMISSION_ID
  results           $RUN_DIR on the cluster (metrics.jsonl, curves.png, tensorboard/, final_policy/); fetch with
                      ray rsync-down deploy/cluster.yaml $RUN_DIR ./runs/          (cluster launcher)
                      kubectl cp <head-pod>:$RUN_DIR ./runs/$SUBMISSION_ID        (KubeRay)
EOF

if [[ "${FOLLOW:-0}" == 1 ]]; then
  exec ray job logs --address "$RAY_ADDRESS" --follow "$SUBMISSION_ID"
fi
