# The Redis container's probes: an authenticated PING must answer PONG. The password goes from
# the mounted Secret into REDISCLI_AUTH, never onto a command line (where ps would show it).
# "LOADING" (AOF replay after a restart) and "NOAUTH" are not PONG, so they fail the probe.
IFS= read -r REDISCLI_AUTH < /run/secrets/redis/password
export REDISCLI_AUTH
[ "$(redis-cli -h 127.0.0.1 -p 6379 ping)" = PONG ]
