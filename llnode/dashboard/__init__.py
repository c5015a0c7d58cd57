"""The live web dashboard every node serves at ``/``: the gossip view, plan, throughput, events, chat."""
