"""Generation: the Engine protocol the HTTP API serves from, sampling, detokenization, the single-process
engine (``local``) and the distributed pipeline (``protocol``, ``stage``, ``distributed``)."""
