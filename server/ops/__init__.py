"""What an operator watches: Prometheus metrics (`metrics`), log lines (`logs`) and the background probes of
the stores and disks (`probes`). Imports `protocol` and `store`; the endpoints that show them are in
`transport.health`."""
