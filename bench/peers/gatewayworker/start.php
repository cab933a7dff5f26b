<?php
// One node of a GatewayWorker cluster for the side-by-side benchmark, laid
// out the way GatewayWorker's start files deploy it: a Register (node a
// only), a Gateway with a WebSocket port, BusinessWorkers running Events.php,
// and an HTTP API (Workerman's Http protocol) that calls
// GatewayWorker\Lib\Gateway as a web back end does. Two nodes started with
// the same Register are two servers of one cluster.
//
// usage: [GW_* env, below] php start.php start [-d]
//        php start.php stop      (same GW_NODE and GW_RUN)
// Every process writes its pid to $GW_RUN/pid.<name>.<n>; the master's is
// $GW_RUN/master.<node>.pid.

use GatewayWorker\BusinessWorker;
use GatewayWorker\Gateway;
use GatewayWorker\Register;
use Workerman\Connection\TcpConnection;
use Workerman\Protocols\Http\Request;
use Workerman\Protocols\Http\Response;
use Workerman\Worker;

require __DIR__ . '/vendor/autoload.php';
require __DIR__ . '/Events.php';

/**
 * GatewayWorker's client library as the API uses it, with TCP_NODELAY on its
 * persistent connections to the gateways: a bind followed by its confirming
 * query is two small writes, which Nagle's algorithm and the gateway's
 * delayed ACK would hold for 40 ms. GW_API_NODELAY=0: stock (Nagle on).
 */
class Api extends GatewayWorker\Lib\Gateway
{
    protected static function getGatewayConnection($address)
    {
        static $tuned = [];
        $client = parent::getGatewayConnection($address);
        // Resource ids are never reused within a process.
        $key = get_resource_id($client);
        if (!isset($tuned[$key]) && getenv('GW_API_NODELAY') !== '0') {
            socket_set_option(socket_import_stream($client), SOL_TCP, TCP_NODELAY, 1);
            $tuned[$key] = true;
        }
        return $client;
    }
}

function env(string $name, string|int $default): string
{
    $v = getenv($name);
    return $v === false || $v === '' ? (string)$default : $v;
}

$node = env('GW_NODE', 'a');
$port = (int)env('GW_PORT', 9380);                       // clients' WebSocket port
$apiPort = (int)env('GW_API_PORT', $port + 1);           // HTTP API; 0: none
$register = env('GW_REGISTER', '127.0.0.1:' . ($port + 9));
$runRegister = env('GW_RUN_REGISTER', $node === 'a' ? 1 : 0) === '1';
$startPort = (int)env('GW_START_PORT', $port + 10);      // inner ports: startPort + process number
// Workerman's select() loop (no ext-event here) serves fds below 1024 per
// process: 6 processes hold 5,000 clients (~830 each, spread by SO_REUSEPORT).
$gateways = (int)env('GW_GATEWAYS', 6);
$workers = (int)env('GW_WORKERS', 2);
$apiProcs = (int)env('GW_API_PROCS', 4);
$run = env('GW_RUN', sys_get_temp_dir() . "/gatewayworker-$port");
putenv("GW_RUN=$run");
putenv('GW_CLUSTER_GATEWAYS=' . env('GW_CLUSTER_GATEWAYS', $gateways));
$clusterWorkers = (int)env('GW_CLUSTER_WORKERS', $workers);

@mkdir($run, 0777, true);
Worker::$pidFile = "$run/master.$node.pid";
Worker::$logFile = "$run/workerman.$node.log";
Worker::$statusFile = "$run/status.$node";
Worker::$stdoutFile = "$run/stdout.$node.log";

$recordPid = function (Worker $w) use ($run): void {
    file_put_contents("$run/pid.{$w->name}.{$w->id}", getmypid() . "\n");
};
if (($argv[1] ?? '') === 'start') {
    foreach (array_merge(glob("$run/pid.*-$node.*"), glob("$run/ready.*-$node.*")) as $stale) {
        unlink($stale);
    }
}

if ($runRegister) {
    $r = new Register('text://' . $register);
    $r->name = "register-$node";
    $r->onWorkerStart = $recordPid;
}

$g = new Gateway("websocket://127.0.0.1:$port");
$g->name = "gateway-$node";
$g->count = $gateways;
$g->reusePort = true; // the kernel spreads clients over the processes
$g->lanIp = '127.0.0.1';
$g->startPort = $startPort;
$g->registerAddress = $register;
// No heartbeat: the load generator's clients never send data, and
// GatewayWorker's heartbeat counts only client data (not pong frames).
$g->pingInterval = 0;
$g->onWorkerStart = $recordPid;

$b = new BusinessWorker();
$b->name = "worker-$node";
$b->count = $workers;
$b->registerAddress = $register;
$b->eventHandler = 'Events';
$b->onWorkerStart = $recordPid;

if ($apiPort > 0) {
    $api = new Worker("http://127.0.0.1:$apiPort");
    $api->name = "api-$node";
    $api->count = $apiProcs;
    $api->reusePort = true;
    $api->onWorkerStart = function (Worker $w) use ($recordPid, $register): void {
        $recordPid($w);
        Api::$registerAddress = $register;
    };
    $api->onMessage = function (TcpConnection $c, Request $req) use ($run, $clusterWorkers): void {
        $c->send(handle($req, $run, $clusterWorkers));
    };
}

/** One API call; binds and joins answer once the owning gateway process applied them. */
function handle(Request $req, string $run, int $clusterWorkers): Response
{
    $json = fn (int $status, array $body) => new Response($status, ['Content-Type' => 'application/json'], json_encode($body));
    $path = $req->path();
    if ($path === '/readyz') {
        // Ready once every BusinessWorker of the cluster is connected to every gateway process.
        $ready = count(glob("$run/ready.*")) >= $clusterWorkers;
        return $json($ready ? 200 : 503, ['ready' => $ready]);
    }
    $p = json_decode($req->rawBody(), true);
    if (!is_array($p)) {
        return $json(400, ['error' => 'invalid json']);
    }
    $data = isset($p['data']) && !is_string($p['data']) ? json_encode($p['data']) : ($p['data'] ?? '');
    try {
        switch ($path) {
            case '/api/bind_uid':
                Api::bindUid($p['client_id'], (string)$p['uid']);
                // A query on the same connection to the same gateway process
                // is answered after the bind is applied, so a push sent after
                // this reply finds the binding.
                Api::isOnline($p['client_id']);
                break;
            case '/api/join_group':
                Api::joinGroup($p['client_id'], (string)$p['group']);
                Api::isOnline($p['client_id']);
                break;
            case '/api/send_to_uid':
                Api::sendToUid((string)$p['uid'], $data);
                break;
            case '/api/send_to_group':
                Api::sendToGroup((string)$p['group'], $data);
                break;
            case '/api/send_to_all':
                Api::sendToAll($data);
                break;
            default:
                return $json(404, ['error' => 'unknown method']);
        }
    } catch (Throwable $e) {
        return $json(503, ['error' => $e->getMessage()]);
    }
    return $json(200, ['ok' => true]);
}

Worker::runAll();
