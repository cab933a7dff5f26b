<?php
/**
 * Handle gatecast's connect / message / close events from the Redis stream.
 *
 * With `--events`, every gatecast node appends one entry per event to the
 * Redis Stream `<prefix>:events`. This program is the backend side, the
 * counterpart of GatewayWorker's BusinessWorker onConnect / onMessage /
 * onClose: it reads the stream with a consumer group (each event goes to one
 * consumer of the group; run as many as you like, each with its own name),
 * handles each event, then acknowledges it (XACK). An event whose handler
 * failed, or whose consumer died before acknowledging it, stays pending and
 * is reclaimed with XAUTOCLAIM: delivery is at least once. docs/events.md
 * describes the entry format and the guarantees.
 *
 * The demo handler echoes each message back to its sender through gatecast's
 * HTTP API (send_to_client): text as "echo: <text>", binary as the same
 * bytes.
 *
 * Needs phpredis (Debian: php8.2-redis; PECL: redis) and allow_url_fopen
 * for the HTTP call (no curl needed).
 *
 *     php consume_events.php [options] REDIS_URL API_URL
 *
 *     REDIS_URL            the Redis gatecast writes to, e.g. redis://127.0.0.1:6379
 *     API_URL              gatecast's HTTP API, e.g. http://127.0.0.1:8081/api
 *     --prefix P           gatecast's --redis-prefix (default gatecast)
 *     --group G            the consumer group (default backend)
 *     --consumer C         this consumer's name, unique in the group
 *                          (default <hostname>-<pid>)
 *     --start ID           where a new group starts: $ (default, only events
 *                          written from now on) or 0 (the whole stream)
 *     --claim-min-idle MS  on start and every 30 s, take over the entries left
 *                          pending for at least MS milliseconds by any
 *                          consumer (XAUTOCLAIM; default 60000)
 *     --max-events N       exit after handling N events (default: run forever)
 *     --no-ack             never XACK (to see entries stay pending)
 *     --api-key KEY        gatecast's --api-key (default $GATECAST_API_KEY)
 *
 * Each handled event is printed on stdout as one JSON line: the entry's
 * fields, plus its stream `id` and `reclaimed` (true when it came from
 * XAUTOCLAIM); `session` and `headers` parsed, `time_ms` a number, `uid`
 * null when there is none, and for messages `binary` a boolean with the data
 * in `data` (text frames) or `data_base64` (binary frames), as in the
 * webhook.
 */

declare(strict_types=1);

const READ_COUNT = 100;      // entries per XREADGROUP / XAUTOCLAIM
const BLOCK_MS = 1000;       // how long one XREADGROUP waits for new entries
const RECLAIM_EVERY_S = 30;  // how often a running consumer looks for stale entries

/** A small client of gatecast's HTTP API (POST /api/<method>). */
final class Gatecast
{
    public function __construct(private string $baseUrl, private ?string $apiKey = null)
    {
        $this->baseUrl = rtrim($baseUrl, '/');
    }

    public function call(string $method, array $params): mixed
    {
        $headers = "Content-Type: application/json\r\n";
        if ($this->apiKey !== null && $this->apiKey !== '') {
            $headers .= "Authorization: Bearer {$this->apiKey}\r\n";
        }
        $context = stream_context_create(['http' => [
            'method' => 'POST',
            'header' => $headers,
            // (object) so that [] is sent as {}, not as a JSON array.
            'content' => json_encode((object) $params, JSON_THROW_ON_ERROR),
            'timeout' => 5,
            'ignore_errors' => true, // read the error body of a 4xx/5xx
        ]]);
        $body = @file_get_contents("{$this->baseUrl}/{$method}", false, $context);
        $reply = $body === false ? null : json_decode($body, true);
        if (!is_array($reply) || array_key_exists('error', $reply)) {
            $why = is_array($reply) ? json_encode($reply['error']) : 'unreachable';
            throw new RuntimeException("gatecast {$method}: {$why}");
        }
        return $reply['result'];
    }

    /** To one connection; $binary: a binary frame instead of text. */
    public function sendToClient(string $clientId, string $data, bool $binary = false): void
    {
        $this->call('send_to_client', $binary
            ? ['client_id' => $clientId, 'data_base64' => base64_encode($data)]
            : ['client_id' => $clientId, 'data' => $data]);
    }
}

// ----- the business logic: one function per event type -------------------------

/**
 * A client connected (GatewayWorker: onConnect + onWebSocketConnect).
 *
 * $event['query'] is the raw query string of /ws, $event['headers'] the
 * origin, user-agent, cookie, proxy headers... of the upgrade request. A real
 * backend would authenticate here and call bind_uid / join_group.
 */
function on_connect(Gatecast $api, array $event): void
{
}

/** A client sent a message: echo it back through the HTTP API. */
function on_message(Gatecast $api, array $event): void
{
    if ($event['binary']) {
        $api->sendToClient($event['client_id'], $event['data'], binary: true);
    } else {
        $api->sendToClient($event['client_id'], 'echo: ' . $event['data']);
    }
}

/**
 * A connection closed. Its uid and session are in the event; gatecast has
 * already forgotten them (and its groups).
 */
function on_close(Gatecast $api, array $event): void
{
}

/**
 * A client that opted in to recovery came back with its resume token:
 * $event['client_id'] (its new id) has the uid, groups and session of
 * $event['old_client_id'] now. Move any state kept per client_id over.
 */
function on_resumed(Gatecast $api, array $event): void
{
}

// ----- the stream ------------------------------------------------------------------

/** A stream entry (field => raw value) as PHP values. */
function decode_event(string $id, array $f): array
{
    $event = [
        'id' => $id,
        'type' => $f['type'],
        'client_id' => $f['client_id'],
        'node' => $f['node'],
        'uid' => $f['uid'] === '' ? null : $f['uid'],
        // `true`: JSON objects as arrays; an empty session is `{}`.
        'session' => json_decode($f['session'], true, 512, JSON_THROW_ON_ERROR),
        'time_ms' => (int) $f['time_ms'],
    ];
    if ($f['type'] === 'connect') {
        $event['remote_addr'] = $f['remote_addr'];
        $event['query'] = $f['query'];
        $event['headers'] = json_decode($f['headers'], true, 512, JSON_THROW_ON_ERROR);
    } elseif ($f['type'] === 'resumed') {
        $event['old_client_id'] = $f['old_client_id'];
    } elseif ($f['type'] === 'message') {
        // Text frames are UTF-8 (gatecast checks); binary frames are bytes.
        $event['binary'] = $f['binary'] === '1';
        $event['data'] = $f['data'];
    }
    return $event;
}

function printable(array $event, bool $reclaimed): string
{
    $out = $event + ['reclaimed' => $reclaimed];
    // Empty PHP arrays would print as [], not {}.
    $out['session'] = (object) $out['session'];
    if (isset($out['headers'])) {
        $out['headers'] = (object) $out['headers'];
    }
    if (($out['binary'] ?? false) === true) {
        $out['data_base64'] = base64_encode($out['data']);
        unset($out['data']);
    }
    return json_encode($out, JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES | JSON_THROW_ON_ERROR);
}

final class Consumer
{
    private int $handled = 0;
    private string $stream;

    public function __construct(
        private Redis $redis,
        private Gatecast $api,
        string $prefix,
        private string $group,
        private string $name,
        private int $minIdleMs,
        private ?int $maxEvents,
        private bool $ack,
    ) {
        $this->stream = "{$prefix}:events";
    }

    /** XGROUP CREATE <stream> <group> <start> MKSTREAM, once per group. */
    public function createGroup(string $start): void
    {
        if (!$this->redis->xGroup('CREATE', $this->stream, $this->group, $start, true)) {
            $error = (string) $this->redis->getLastError();
            $this->redis->clearLastError();
            if (!str_starts_with($error, 'BUSYGROUP')) {
                throw new RuntimeException("XGROUP CREATE: {$error}");
            }
        }
    }

    private function done(): bool
    {
        return $this->maxEvents !== null && $this->handled >= $this->maxEvents;
    }

    /**
     * How many entries to take at once: no more than --max-events needs, so
     * that none is left delivered but unhandled.
     */
    private function batch(): int
    {
        return $this->maxEvents === null ? READ_COUNT : min(READ_COUNT, $this->maxEvents - $this->handled);
    }

    private function handle(string $id, array $fields, bool $reclaimed = false): void
    {
        $event = decode_event($id, $fields);
        $handler = ['connect' => 'on_connect', 'message' => 'on_message', 'close' => 'on_close', 'resumed' => 'on_resumed'][$event['type']] ?? null;
        try {
            if ($handler !== null) {
                $handler($this->api, $event);
            }
        } catch (Throwable $e) {
            fwrite(STDERR, "event {$id} failed, left pending: {$e->getMessage()}\n");
            return;
        }
        if ($this->ack) {
            $this->redis->xAck($this->stream, $this->group, [$id]);
        }
        $this->handled++;
        fwrite(STDOUT, printable($event, $reclaimed) . "\n");
    }

    /**
     * Takes over the entries that consumers (dead ones, this one in an
     * earlier run, or a handler that failed) read and did not acknowledge
     * for at least --claim-min-idle milliseconds.
     */
    private function reclaim(): void
    {
        $cursor = '0-0';
        while (!$this->done()) {
            // phpredis 5 has no xAutoClaim(): the raw reply is
            // [next cursor, [[id, [field, value, ...]], ...], deleted ids].
            $reply = $this->redis->rawCommand(
                'XAUTOCLAIM', $this->stream, $this->group, $this->name,
                (string) $this->minIdleMs, $cursor, 'COUNT', (string) $this->batch(),
            );
            if (!is_array($reply)) {
                throw new RuntimeException('XAUTOCLAIM: ' . $this->redis->getLastError());
            }
            [$cursor, $entries] = $reply;
            foreach ($entries as $entry) {
                if (!is_array($entry)) {
                    continue; // trimmed away while pending (Redis 6.2)
                }
                [$id, $flat] = $entry;
                $fields = [];
                for ($i = 0; $i + 1 < count($flat); $i += 2) {
                    $fields[$flat[$i]] = $flat[$i + 1];
                }
                $this->handle($id, $fields, true);
                if ($this->done()) {
                    return;
                }
            }
            if ($cursor === '0-0') {
                return;
            }
        }
    }

    public function run(): void
    {
        $this->reclaim();
        $lastReclaim = microtime(true);
        while (!$this->done()) {
            if (microtime(true) - $lastReclaim >= RECLAIM_EVERY_S) {
                $this->reclaim();
                $lastReclaim = microtime(true);
            }
            // ">": entries never delivered to any consumer of the group.
            $reply = $this->redis->xReadGroup(
                $this->group, $this->name, [$this->stream => '>'], $this->batch(), BLOCK_MS,
            );
            if ($reply === false) {
                throw new RuntimeException('XREADGROUP: ' . $this->redis->getLastError());
            }
            foreach ($reply[$this->stream] ?? [] as $id => $fields) {
                $this->handle((string) $id, $fields);
                if ($this->done()) {
                    return;
                }
            }
        }
    }
}

function connect_redis(string $url): Redis
{
    $u = parse_url($url);
    if ($u === false || !in_array($u['scheme'] ?? '', ['redis', 'rediss'], true)) {
        throw new InvalidArgumentException("not a redis:// URL: {$url}");
    }
    $host = ($u['scheme'] === 'rediss' ? 'tls://' : '') . ($u['host'] ?? '127.0.0.1');
    $redis = new Redis();
    $redis->connect($host, $u['port'] ?? 6379, 2.0);
    // Longer than BLOCK_MS, or XREADGROUP ... BLOCK would time out.
    $redis->setOption(Redis::OPT_READ_TIMEOUT, BLOCK_MS / 1000 + 5);
    if (isset($u['pass'])) {
        $user = urldecode($u['user'] ?? '');
        $redis->auth($user !== '' ? [$user, urldecode($u['pass'])] : urldecode($u['pass']));
    }
    $db = (int) ltrim($u['path'] ?? '', '/');
    if ($db > 0) {
        $redis->select($db);
    }
    return $redis;
}

function usage(): int
{
    fwrite(STDERR, "usage: php consume_events.php [--prefix P] [--group G] [--consumer C] [--start \$|0]\n"
        . "       [--claim-min-idle MS] [--max-events N] [--no-ack] [--api-key KEY] REDIS_URL API_URL\n");
    return 2;
}

function main(array $argv): int
{
    $opts = [
        'prefix' => 'gatecast',
        'group' => 'backend',
        'consumer' => gethostname() . '-' . getmypid(),
        'start' => '$',
        'claim-min-idle' => '60000',
        'max-events' => null,
        'api-key' => getenv('GATECAST_API_KEY') ?: null,
    ];
    $noAck = false;
    $positional = [];
    $args = array_slice($argv, 1);
    while ($args) {
        $arg = array_shift($args);
        if ($arg === '--no-ack') {
            $noAck = true;
        } elseif (str_starts_with($arg, '--')) {
            [$name, $value] = str_contains($arg, '=') ? explode('=', substr($arg, 2), 2) : [substr($arg, 2), array_shift($args)];
            if (!array_key_exists($name, $opts) || $value === null) {
                return usage();
            }
            $opts[$name] = $value;
        } else {
            $positional[] = $arg;
        }
    }
    if (count($positional) !== 2) {
        return usage();
    }
    [$redisUrl, $apiUrl] = $positional;

    $redis = connect_redis($redisUrl);
    $consumer = new Consumer(
        $redis,
        new Gatecast($apiUrl, $opts['api-key']),
        $opts['prefix'],
        $opts['group'],
        $opts['consumer'],
        (int) $opts['claim-min-idle'],
        $opts['max-events'] === null ? null : (int) $opts['max-events'],
        !$noAck,
    );
    $consumer->createGroup($opts['start']);
    $consumer->run();
    $redis->close();
    return 0;
}

exit(main($argv));
