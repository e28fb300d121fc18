"""``megallama doctor``: a preflight for a multi-node launch. :mod:`.hostfile` reads DeepSpeed's
hostfile, :mod:`.system` is every contact with the machine and the network (replaced by fakes in
tests), :mod:`.probe` gathers each host's facts over one bounded ssh call, :mod:`.checks` turns
facts into one-line problems."""
