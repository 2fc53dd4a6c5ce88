"""MODEL source <-> nn.Module: model families behind one registry (families/), specs, building, weights files, the
Hub, the input a model takes, where its blocks are. Nothing here imports checkpoint/ or anything above it: lrc
checkpoints are read by checkpoint.io and `adapters.loading.load_model` reads every source."""
