"""The command-line tools users run besides the two stages: checkpoint conversion, tar shards, data statistics,
reconstruction pictures and kNN evaluation (console scripts fcmae-convert, fcmae-make-shards, fcmae-data-stats,
fcmae-visualize, fcmae-knn)."""
