<?php
// The BusinessWorker's event handler: the welcome frame the load generator
// waits for, sent at connect as GatewayWorker's own examples do (the
// gateway holds it until the WebSocket handshake is done).

use GatewayWorker\BusinessWorker;
use GatewayWorker\Lib\Gateway;
use Workerman\Timer;

class Events
{
    /** Marks this process ready once it is connected to every gateway process of the cluster. */
    public static function onWorkerStart(BusinessWorker $worker): void
    {
        $expect = (int)getenv('GW_CLUSTER_GATEWAYS');
        $marker = getenv('GW_RUN') . "/ready.{$worker->name}.{$worker->id}";
        $timer = Timer::add(0.02, function () use ($worker, $expect, $marker, &$timer) {
            if (count($worker->gatewayConnections) >= $expect) {
                touch($marker);
                Timer::del($timer);
            }
        });
    }

    public static function onConnect(string $client_id): void
    {
        Gateway::sendToClient($client_id, json_encode(['client_id' => $client_id]));
    }

    public static function onMessage(string $client_id, mixed $message): void
    {
    }

    public static function onClose(string $client_id): void
    {
    }
}
