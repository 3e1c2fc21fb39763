// bench/peers/ws-node: a WebSocket broadcast server written the plain way, the baseline
// bench/run compares Herald with. GET /sub/<channel> (WebSocket) subscribes; POST
// /pub/<channel> sends the body to every subscriber of <channel>, one ws.send per client.
// Prints "listening on http://HOST:PORT" once it accepts connections. PORT=0: any free port.
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const channels = new Map();

const server = http.createServer((req, res) => {
  if (req.method === 'POST' && req.url.startsWith('/pub/')) {
    const channel = req.url.slice(5);
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString();
      const subscribers = channels.get(channel);
      let delivered = 0;
      if (subscribers) {
        for (const ws of subscribers) {
          ws.send(body);
          delivered++;
        }
      }
      const reply = `{"delivered":${delivered}}`;
      res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Length': reply.length });
      res.end(reply);
    });
    return;
  }
  res.writeHead(404, { 'Content-Length': 0 });
  res.end();
});

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });
server.on('upgrade', (req, socket, head) => {
  if (!req.url.startsWith('/sub/') || req.url.length <= 5) {
    socket.destroy();
    return;
  }
  const channel = req.url.slice(5);
  wss.handleUpgrade(req, socket, head, (ws) => {
    let subscribers = channels.get(channel);
    if (!subscribers) {
      subscribers = new Set();
      channels.set(channel, subscribers);
    }
    subscribers.add(ws);
    ws.on('close', () => {
      subscribers.delete(ws);
      if (subscribers.size === 0 && channels.get(channel) === subscribers) channels.delete(channel);
    });
    ws.on('error', () => {});
  });
});

server.listen(Number(process.env.PORT || 0), process.env.HOST || '127.0.0.1', () => {
  const { address, port } = server.address();
  console.log(`ws-node listening on http://${address}:${port}`);
});
