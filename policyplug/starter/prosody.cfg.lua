plugin_paths = { "/opt/policyplug/adapters/prosody" }
policyplug_socket = "/run/policyplug/policyplug.sock"
policyplug_fail_mode = "open"   -- while you read the audit log; then "closed"
component_ports = { 5347 }
component_interfaces = { "127.0.0.1" }
Component "policy.example.com"
    component_secret = os.getenv("POLICYPLUG_COMPONENT_SECRET")
