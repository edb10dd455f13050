"""One process, several devices: the two-device split of one engine (``split``) and A14B's experts pipelined over
two devices (``experts``). No torch.distributed here (that is ``artifex.distributed``)."""
