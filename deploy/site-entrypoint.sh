#!/bin/sh
# Check the site's data, then run the SuperNode (all settings from the environment, see site.env.example).
# `gliofed deploy supervise` (PID 1 here) reaps orphans and, on `docker stop`, ends the SuperNode's whole
# process group, so no flwr-clientapp outlives a stopped site.
set -eu
gliofed site check "$GLIOFED_DATA_PATH"
exec gliofed deploy supervise -- flower-supernode \
  --superlink "$GLIOFED_SUPERLINK" \
  --root-certificates /pki/ca.crt \
  --auth-supernode-private-key "/pki/$GLIOFED_SITE_ID" \
  --node-config "data-path=\"$GLIOFED_DATA_PATH\" site-id=\"$GLIOFED_SITE_ID\" max-epsilon=$GLIOFED_MAX_EPSILON device=\"$GLIOFED_DEVICE\""
