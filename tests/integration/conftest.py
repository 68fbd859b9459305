"""Fixtures shared by the integration tests: factories of the real servers they start
(tests/servers/), each under its fixture name, for every test in this folder."""

from tests.servers import ldap, postgres, prosody, redis

prosody_server = prosody.prosody_server
redis_server = redis.redis_server_fixture
postgres_server = postgres.postgres_server_fixture
ldap_server = ldap.ldap_server_fixture
