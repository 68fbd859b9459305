"""Usage counting (store.py) and reports (report.py) for `policyplug report`."""
