-- Loads mod_policyplug.lua outside Prosody, with a stub of the module API, and reads stanzas
-- (one XML document a line, on stdin) through its content_of: one JSON line out per stanza,
-- {"body": ..., "subject": ..., "unreadable": ...}. Used by tests/test_prosody_content_reader.py.
-- luacheck: globals prosody
package.path = "/usr/lib/prosody/?.lua;" .. package.path;
package.cpath = "/usr/lib/prosody/?.so;" .. package.cpath;
local json = require "util.json";
local xml = require "util.xml";
local set = require "util.set";

local noop = function () end;
local metric = { with_labels = function () return { add = noop }; end };
local module = { host = "acme.example", name = "policyplug" };
function module.get_option_string(_, _, default) return default; end
function module.get_option_number(_, _, default) return default; end
function module.get_option_boolean(_, _, default) return default; end
function module.get_option_set(_, _, default) return set.new(default); end
function module.metric() return metric; end
module.add_timer, module.hook, module.hook_global, module.log, module.send = noop, noop, noop, noop, noop;
prosody = { core_post_stanza = noop };

local env = setmetatable({ module = module, prosody = prosody }, { __index = _G });
local folder = arg[1]:match("^(.*)/") or ".";
function module.require(_, lib) -- Prosody's module:require: LIB.lib.lua beside the module, in its environment
	return assert(loadfile(folder .. "/" .. lib .. ".lib.lua", "t", env))();
end
local chunk = assert(loadfile(arg[1], "t", env));
chunk();
local content_of = assert(module.content_of, "mod_policyplug exports no content_of");

for line in io.lines() do
	local stanza, err = xml.parse(line);
	local out;
	if not stanza then
		out = { error = tostring(err) };
	else
		local body, subject, unreadable = content_of(stanza);
		out = { body = body or json.null, subject = subject or json.null, unreadable = unreadable or json.null };
	end
	io.write(json.encode(out), "\n");
	io.flush();
end
