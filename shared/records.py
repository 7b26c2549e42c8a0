"""Names of the records and metric keys exchanged between the ServerApp and the ClientApps.

Both sides import these constants so a typo cannot silently break aggregation. Flower stays out of
``shared``: the ArrayRecord <-> state_dict helpers live in ``client/`` and ``server/``.
"""

from __future__ import annotations

ARRAYS = "arrays"  # ArrayRecord with the model weights
CONFIG = "config"  # ConfigRecord sent by the server
METRICS = "metrics"  # MetricRecord in replies
ELIGIBLE = "eligible"  # MetricRecord in query replies: eligible case counts

NUM_EXAMPLES = "num-examples"  # the weighting key (true example count, not batches)
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
TASK = "task"
SITE_ID = "site-id"  # a ConfigRecord entry naming the site (a hospital name, never a patient)
TRAIN_SECONDS = "train-seconds"
TRAIN_LOSS = "train-loss"
SKIPPED = "skipped"  # eligible cases a site left out because an image was unusable

CONFUSION = "confusion"  # flattened K x K int counts (row = true class)
SCORE_HIST = "score-hist"  # flattened K x 2 x BINS int counts (positives / negatives of p_k)
NUM_CLASSES = "num-classes"
ELIGIBLE_TOTAL = "eligible-total"
ELIGIBLE_PREFIX = "eligible-"  # eligible-<split>-<class> counts in query replies

# Keys a reply may carry (besides per-metric floats): the privacy test checks nothing else leaves a site
REPLY_RECORDS = (ARRAYS, METRICS, ELIGIBLE, CONFIG)
