-- A Prosody 0.12 configuration that puts every stanza of example.com through policyplug.
-- Start the decision service beside it:
--   policyplug serve /etc/policyplug/site.policy --component policy.example.com \
--       --secret "$POLICYPLUG_COMPONENT_SECRET" --server 127.0.0.1:5347
admins = { }
plugin_paths = { "/opt/policyplug/adapters/prosody" }   -- where mod_policyplug.lua lives

modules_enabled = {
	"roster"; "saslauth"; "tls"; "dialback"; "disco"; "ping"; "register"; "posix";
	"policyplug";                       -- ask policyplug about every stanza
}

-- The decision service connects as an XEP-0114 component: only on loopback.
component_ports = { 5347 }
component_interface = "127.0.0.1"

policyplug_component = "policy.example.com"   -- the service's component JID
policyplug_timeout = 2                        -- seconds to wait for a decision
policyplug_fail_mode = "closed"               -- "closed" refuses when the service is down; "open" delivers
-- policyplug_kinds = { "message", "groupchat", "subscribe", "file", "login" }  -- check only these

authentication = "internal_hashed"
storage = "internal"
c2s_require_encryption = true
s2s_require_encryption = true
s2s_secure_auth = true

VirtualHost "example.com"
	ssl = { key = "/etc/prosody/certs/example.com.key"; certificate = "/etc/prosody/certs/example.com.crt"; }

Component "policy.example.com"
	component_secret = os.getenv("POLICYPLUG_COMPONENT_SECRET") or "change me"
