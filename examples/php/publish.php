<?php
/**
 * Push to gatecast WebSocket clients by publishing straight to Redis.
 *
 * Every push or command is one PUBLISH (SPUBLISH on Redis Cluster) of a
 * MessagePack map, the envelope, on a gatecast channel: no gatecast library
 * and no HTTP call. The format is described in docs/publishing.md.
 *
 * Needs phpredis and the msgpack extension (Debian: php8.2-redis,
 * php8.2-msgpack; PECL: redis, msgpack).
 *
 *     php publish.php [--cluster] REDIS_URL PREFIX SCENARIO CLIENT_ID...
 *
 * SCENARIO is one of the fixed sequences that tests/examples.rs checks:
 *
 *     commands A B   A joins "room" and "lobby", B joins "room", B is bound
 *                    to uid "bob", A's session becomes
 *                    {"name": "alice", "n": 1}
 *     pushes A B     a text push to A, to uid "bob", to "room" except B, to
 *                    "room" and "lobby" (once per connection), a binary push
 *                    to B, a push to everyone
 *     cleanup A B    A's session gets n=2, A leaves "lobby", "bob" is
 *                    unbound from B, "room" is emptied
 *     close A B      pushes to "room" and "bob" (nobody is left there), then
 *                    closes A after a last message and B without one
 *
 * --cluster: REDIS_URL is a Redis Cluster node; publish with SPUBLISH.
 *
 * msgpack_pack() writes every PHP string as MessagePack str, even binary
 * data: gatecast accepts str or bin for `data`, and `binary` alone decides
 * the frame type. uids and group names must be strings (cast integers), and
 * lists must be lists (array_values() after array_filter()).
 */

declare(strict_types=1);

final class GatecastPublisher
{
    private const VERSION = 1;

    /**
     * @param Redis|RedisCluster $redis  a connected client, with
     *        Redis::OPT_SERIALIZER left at SERIALIZER_NONE
     * @param bool $sharded  true on Redis Cluster: SPUBLISH
     */
    public function __construct(
        private Redis|RedisCluster $redis,
        private string $prefix = 'gatecast',
        private bool $sharded = false,
    ) {
    }

    // ----- pushes ----------------------------------------------------------

    /** To one connection; $binary: a binary frame instead of text. */
    public function sendToClient(string $clientId, string $data, bool $binary = false): void
    {
        $clientId = self::checkId($clientId);
        $this->publish($this->node($clientId), self::push($data, $binary) + ['client_ids' => [$clientId]]);
    }

    public function sendToUid(string|int $uid, string $data, bool $binary = false): void
    {
        $this->publish("{$this->prefix}:uid:{$uid}", self::push($data, $binary));
    }

    /** @param string[] $exclude client_ids that must not receive it */
    public function sendToGroup(string|int $group, string $data, array $exclude = [], bool $binary = false): void
    {
        $this->sendToGroups([$group], $data, $exclude, $binary);
    }

    /** Once per connection, even one that is in several of the groups. */
    public function sendToGroups(array $groups, string $data, array $exclude = [], bool $binary = false): void
    {
        $groups = array_map('strval', array_values($groups));
        $envelope = self::push($data, $binary, $exclude);
        if (count($groups) > 1) {
            // The same envelope on every group's channel, naming all of them
            // in the same order: a node delivers on a group's channel only to
            // members of none of the groups listed before it.
            $envelope['groups'] = $groups;
        }
        foreach ($groups as $group) {
            $this->publish("{$this->prefix}:group:{$group}", $envelope);
        }
    }

    public function sendToAll(string $data, array $exclude = [], bool $binary = false): void
    {
        $this->publish("{$this->prefix}:all", self::push($data, $binary, $exclude));
    }

    /** Closes a connection (code 1000), after $data if given. */
    public function closeClient(string $clientId, ?string $data = null, bool $binary = false): void
    {
        $clientId = self::checkId($clientId);
        $envelope = ['op' => 'close', 'client_id' => $clientId];
        if ($data !== null) {
            $envelope['data'] = $data;
            if ($binary) {
                $envelope['binary'] = true;
            }
        }
        $this->publish($this->node($clientId), $envelope);
    }

    // ----- commands: applied by the node holding the connection -------------

    public function bindUid(string $clientId, string|int $uid): void
    {
        $this->command($clientId, ['op' => 'bind_uid', 'uid' => (string) $uid]);
    }

    public function unbindUid(string $clientId, string|int $uid): void
    {
        $this->command($clientId, ['op' => 'unbind_uid', 'uid' => (string) $uid]);
    }

    public function joinGroup(string $clientId, string|int $group): void
    {
        $this->command($clientId, ['op' => 'join_group', 'group' => (string) $group]);
    }

    public function leaveGroup(string $clientId, string|int $group): void
    {
        $this->command($clientId, ['op' => 'leave_group', 'group' => (string) $group]);
    }

    /** @param array<string, mixed> $session a non-empty associative array */
    public function setSession(string $clientId, array $session): void
    {
        $this->command($clientId, ['op' => 'set_session', 'session' => self::map($session)]);
    }

    /** @param array<string, mixed> $session a non-empty associative array */
    public function updateSession(string $clientId, array $session): void
    {
        $this->command($clientId, ['op' => 'update_session', 'session' => self::map($session)]);
    }

    /** Everyone leaves the group (on the group's own channel). */
    public function ungroup(string|int $group): void
    {
        $this->publish("{$this->prefix}:group:{$group}", ['op' => 'ungroup']);
    }

    // ----- the wire ----------------------------------------------------------

    private function command(string $clientId, array $envelope): void
    {
        $clientId = self::checkId($clientId);
        $this->publish($this->node($clientId), $envelope + ['client_id' => $clientId]);
    }

    /** The first 12 hex digits of a client_id name the node that holds it. */
    private function node(string $clientId): string
    {
        return "{$this->prefix}:node:" . substr($clientId, 0, 12);
    }

    private function publish(string $channel, array $envelope): void
    {
        $payload = msgpack_pack(['v' => self::VERSION] + $envelope);
        if ($this->sharded) {
            // phpredis 5 has no spublish(): route by the channel's slot.
            $this->redis->rawCommand($channel, 'SPUBLISH', $channel, $payload);
        } else {
            $this->redis->publish($channel, $payload);
        }
    }

    private static function push(string $data, bool $binary, array $exclude = []): array
    {
        $envelope = ['op' => 'push', 'data' => $data];
        if ($binary) {
            $envelope['binary'] = true;
        }
        if ($exclude) {
            $envelope['exclude'] = array_map([self::class, 'checkId'], array_values($exclude));
        }
        return $envelope;
    }

    /** A session must pack as a map: an empty PHP array packs as a list. */
    private static function map(array $session): array
    {
        if ($session === [] || array_is_list($session)) {
            throw new InvalidArgumentException('a session is a non-empty associative array');
        }
        return $session;
    }

    private static function checkId(string $clientId): string
    {
        $clientId = strtolower($clientId);
        if (!preg_match('/^[0-9a-f]{20}$/', $clientId)) {
            throw new InvalidArgumentException("not a client_id (20 hex digits): {$clientId}");
        }
        return $clientId;
    }
}

// ----- the scripted sequences ---------------------------------------------------

function connect(string $url, bool $cluster): Redis|RedisCluster
{
    $u = parse_url($url);
    if ($u === false || !in_array($u['scheme'] ?? '', ['redis', 'rediss'], true)) {
        throw new InvalidArgumentException("not a redis:// URL: {$url}");
    }
    $host = ($u['scheme'] === 'rediss' ? 'tls://' : '') . ($u['host'] ?? '127.0.0.1');
    $port = $u['port'] ?? 6379;
    $auth = isset($u['pass'])
        ? (isset($u['user']) && $u['user'] !== '' ? [urldecode($u['user']), urldecode($u['pass'])] : urldecode($u['pass']))
        : null;
    if ($cluster) {
        return new RedisCluster(null, ["{$host}:{$port}"], 2.0, 2.0, false, $auth);
    }
    $redis = new Redis();
    $redis->connect($host, $port, 2.0);
    if ($auth !== null) {
        $redis->auth($auth);
    }
    $db = (int) ltrim($u['path'] ?? '', '/');
    if ($db > 0) {
        $redis->select($db);
    }
    return $redis;
}

function main(array $argv): int
{
    $args = array_slice($argv, 1);
    $cluster = ($args[0] ?? '') === '--cluster';
    if ($cluster) {
        array_shift($args);
    }
    $arity = ['commands' => 2, 'pushes' => 2, 'cleanup' => 2, 'close' => 2];
    if (count($args) < 3 || !isset($arity[$args[2]]) || count($args) !== 3 + $arity[$args[2]]) {
        fwrite(STDERR, "usage: php publish.php [--cluster] REDIS_URL PREFIX commands|pushes|cleanup|close A B\n");
        return 2;
    }
    [$url, $prefix, $scenario, $a, $b] = $args;
    $p = new GatecastPublisher(connect($url, $cluster), $prefix, $cluster);
    switch ($scenario) {
        case 'commands':
            $p->joinGroup($a, 'room');
            $p->joinGroup($a, 'lobby');
            $p->joinGroup($b, 'room');
            $p->bindUid($b, 'bob');
            $p->setSession($a, ['name' => 'alice', 'n' => 1]);
            break;
        case 'pushes':
            $p->sendToClient($a, 'hello a ✓');
            $p->sendToUid('bob', 'hello bob');
            $p->sendToGroup('room', 'room without b', [$b]);
            $p->sendToGroups(['room', 'lobby'], 'room or lobby');
            $p->sendToClient($b, "\x00\xff\x80\x9fgatecast", binary: true);
            $p->sendToAll('everyone');
            break;
        case 'cleanup':
            $p->updateSession($a, ['n' => 2]);
            $p->leaveGroup($a, 'lobby');
            $p->unbindUid($b, 'bob');
            $p->ungroup('room');
            break;
        case 'close':
            $p->sendToGroup('room', 'nobody is in room');
            $p->sendToUid('bob', 'nobody is bob');
            $p->closeClient($a, 'bye a');
            $p->closeClient($b);
            break;
    }
    return 0;
}

exit(main($argv));
