#!/usr/bin/env bash
# Puts GatewayWorker, Workerman and workerman/coroutine (what
# `composer require workerman/gateway-worker` installs on PHP 8.1+) into
# vendor/ (gitignored), pinned by commit, from git mirrors (Packagist is not
# reachable from the bench machines), plus a PSR-4 autoloader of our own.
# Their code is never committed to this repository.
#
# usage: [GW_GIT=... WM_GIT=... CO_GIT=...] bench/peers/gatewayworker/setup.sh
#   *_GIT: a git directory (bare mirror or clone) holding the pinned commit.
set -eu
cd "$(dirname "$0")"
GW_GIT=${GW_GIT:-/work/.mirror/walkor+GatewayWorker/repo}
WM_GIT=${WM_GIT:-/work/.mirror/walkor+workerman/repo}
CO_GIT=${CO_GIT:-/work/.mirror/workerman-php+coroutine/repo}
# GatewayWorker v4.0.0 requires workerman ^4.0.30 || ^5.1; workerman v5.2.2
# requires workerman/coroutine ^1.1 (v1.1.4 requires workerman ^5.1).
GW_COMMIT=7828ec72fcad8db8b1d10402379f1a4cf6482f1f # walkor/GatewayWorker v4.0.0
WM_COMMIT=a0866601af066c0eab5a2f7b9aef8bdda8fa1911 # walkor/workerman v5.2.2
CO_COMMIT=b0bebfa9d41b992ad0a835ddf2ee8fa5d58eca44 # workerman-php/coroutine v1.1.4

rm -rf vendor
mkdir -p vendor
extract() { # git-dir commit dest
  mkdir -p "vendor/$3"
  git --git-dir="$1" archive "$2" src composer.json | tar -x -C "vendor/$3"
  echo "$2" >"vendor/$3/COMMIT"
}
extract "$GW_GIT" $GW_COMMIT gateway-worker
extract "$WM_GIT" $WM_COMMIT workerman
extract "$CO_GIT" $CO_COMMIT coroutine

cat >vendor/autoload.php <<'PHP'
<?php
// PSR-4 for the three packages, as their composer.json files declare
// (workerman/coroutine maps both Workerman\Coroutine\ and Workerman\ to its
// src/).
spl_autoload_register(function (string $class): void {
    static $map = [
        ['GatewayWorker\\', __DIR__ . '/gateway-worker/src/'],
        ['Workerman\\Coroutine\\', __DIR__ . '/coroutine/src/'],
        ['Workerman\\', __DIR__ . '/workerman/src/'],
        ['Workerman\\', __DIR__ . '/coroutine/src/'],
    ];
    foreach ($map as [$prefix, $dir]) {
        if (str_starts_with($class, $prefix)) {
            $file = $dir . str_replace('\\', '/', substr($class, strlen($prefix))) . '.php';
            if (is_file($file)) {
                require $file;
                return;
            }
        }
    }
});
PHP
echo "vendor/: gateway-worker $GW_COMMIT, workerman $WM_COMMIT, coroutine $CO_COMMIT"
