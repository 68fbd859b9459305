-- A Prosody 0.12 configuration that puts every stanza of example.com through policyplug.
-- (tests/integration/test_prosody_example.py starts Prosody with this very file, Included, with
-- only ports, paths and TLS overridden for the test.)
--
-- Start the decision service beside it: examples/systemd/policyplug.service runs
--   /opt/policyplug/.venv/bin/policyplug serve /etc/policyplug/site.policy --socket /run/policyplug/policyplug.sock \
--       --component policy.example.com --server 127.0.0.1:5347 --audit-log ... --usage-db ...
-- with the component secret in its environment (POLICYPLUG_COMPONENT_SECRET, from an environment
-- file: never on a command line, where `ps` shows it), and the socket (mode 0660) in Prosody's
-- group, so Prosody can open it. Every host and component below must be in the policy's
-- `local domains` (`policyplug check --prosody-config` this file says which are not).

admins = { }
plugin_paths = { "/opt/policyplug/adapters/prosody" }   -- where mod_policyplug.lua and its *.lib.lua live

modules_enabled = {
	"roster"; "saslauth"; "tls"; "dialback"; "disco"; "ping"; "posix";
	"policyplug";                       -- ask policyplug about every stanza and login
}

-- How mod_policyplug reaches the decision service. The Unix socket is the fast path (decisions
-- pipelined on one connection); without it the module sends decision IQs to the component.
policyplug_socket = "/run/policyplug/policyplug.sock"
-- policyplug_component = "policy.example.com"  -- used when policyplug_socket is not set
policyplug_timeout = 2                          -- seconds to wait for a decision
policyplug_fail_mode = "closed"                 -- "closed": refuse when the service is down; "open": deliver
-- policyplug_kinds = { "message", "groupchat", "subscribe", "join", "file", "login" }  -- check only these

-- The decision service also connects as an XEP-0114 component (its ad-hoc commands: status,
-- reload, decide a test event). Only on loopback.
component_ports = { 5347 }
component_interfaces = { "127.0.0.1" }

authentication = "internal_hashed"
storage = "internal"
c2s_require_encryption = true
s2s_require_encryption = true
s2s_secure_auth = true

VirtualHost "example.com"
	ssl = { key = "/etc/prosody/certs/example.com.key"; certificate = "/etc/prosody/certs/example.com.crt"; }

Component "policy.example.com"
	component_secret = os.getenv("POLICYPLUG_COMPONENT_SECRET") or "change me"
