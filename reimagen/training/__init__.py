"""Training one stage, on one process or many (Sec. 3.2 "Model Training", Sec. 4 "Training details").

    data.py         KNN-ImageText triples in RAM
    shards.py       training shards (webdataset tars read by index with wids) for data beyond RAM
    text_store.py   precomputed text embeddings of the shards, for frozen encoders
    loader.py       one loader for both: a global sample order cut per rank and micro-batch
    step.py         the loss of one batch (Eq. 1-2 with text / neighbour dropout), the optimiser step, the EMA
    state.py        checkpoints of a run: save, resume, keep-last, sharded (FSDP) or full
    config.py       TrainConfig: a run's settings
    train.py        the Trainer: data, the loop, the logs (with step.py and state.py as its parts)
    distributed.py  torch.distributed: process group, DDP / FSDP2 wrapping, full tensors from shards

Never imports ``reimagen.pipelines`` (nor they this).
"""
