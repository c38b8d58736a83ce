// A real Node HTTP server (node:http, llhttp) standing in for the gateway: it answers every
// request with what Node made of it, and records it, so a test can see exactly what a Node
// gateway receives through clawgate.
//
//   node node_echo.js [maxHeadersCount]     prints "listening <port>" once bound to 127.0.0.1
//
// Every request is answered (after its body) with JSON: method, url, rawHeaders, headers,
// rawTrailers, trailers, bodyBytes. A WebSocket upgrade is answered 101 and the same JSON in
// one unmasked text frame. GET /__echo/seen (asked directly, not through clawgate) returns
// everything recorded: connections, requests (including those whose body never ended),
// upgrades, clientErrors (what Node itself refused, e.g. its own 431).
'use strict';
const http = require('node:http');

const seen = { connections: 0, requests: [], upgrades: [], clientErrors: [] };
const server = http.createServer();
if (process.argv[2] !== undefined) server.maxHeadersCount = Number(process.argv[2]);

function view(req) {
  return {
    method: req.method, url: req.url, rawHeaders: req.rawHeaders, headers: req.headers,
    rawTrailers: req.rawTrailers, trailers: req.trailers, bodyBytes: 0, complete: false,
  };
}

server.on('connection', () => { seen.connections += 1; });
server.on('clientError', (err, socket) => {
  seen.clientErrors.push(err.code || String(err));
  if (socket.writable) {
    const status = err.code === 'HPE_HEADER_OVERFLOW' ? '431 Request Header Fields Too Large'
      : '400 Bad Request';
    socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
  } else {
    socket.destroy();
  }
});

server.on('request', (req, res) => {
  if (req.url === '/__echo/seen' && req.socket.remoteAddress === '127.0.0.1' &&
      req.headers['x-echo-control'] === '1') {
    res.setHeader('Content-Type', 'application/json');
    res.end(JSON.stringify(seen));
    return;
  }
  const rec = view(req);
  seen.requests.push(rec);
  req.on('data', (chunk) => { rec.bodyBytes += chunk.length; });
  req.on('end', () => {
    rec.complete = true;
    rec.rawTrailers = req.rawTrailers;
    rec.trailers = req.trailers;
    res.setHeader('Content-Type', 'application/json');
    res.end(JSON.stringify(rec));
  });
});

server.on('upgrade', (req, socket) => {
  const rec = view(req);
  rec.complete = true;
  seen.upgrades.push(rec);
  const payload = Buffer.from(JSON.stringify(rec));
  let hdr;
  if (payload.length < 126) {
    hdr = Buffer.from([0x81, payload.length]);
  } else if (payload.length < 65536) {
    hdr = Buffer.alloc(4); hdr[0] = 0x81; hdr[1] = 126; hdr.writeUInt16BE(payload.length, 2);
  } else {
    hdr = Buffer.alloc(10); hdr[0] = 0x81; hdr[1] = 127;
    hdr.writeBigUInt64BE(BigInt(payload.length), 2);
  }
  socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n' +
               'Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n');
  socket.write(Buffer.concat([hdr, payload]));
  socket.on('data', () => {});
  socket.on('end', () => socket.end());  // the client went: close our side too
  socket.on('error', () => {});
});

server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
process.on('SIGTERM', () => { server.close(); process.exit(0); });
