// AudioWorklet: the microphone's float samples as PCM16 chunks (little-endian, mono) of `chunkSamples`, posted to
// the page with their RMS level. Runs at the AudioContext's rate; the page declares that rate in session.update.
class Pcm16Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.size = options.processorOptions.chunkSamples;
    this.buffer = new Int16Array(this.size);
    this.filled = 0;
    this.energy = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;  // no input yet (the stream is starting): keep the node alive
    for (let i = 0; i < channel.length; i++) {
      const s = Math.max(-1, Math.min(1, channel[i]));
      this.buffer[this.filled++] = s < 0 ? s * 0x8000 : s * 0x7fff;
      this.energy += s * s;
      if (this.filled === this.size) {
        const pcm = this.buffer.slice().buffer;
        this.port.postMessage({ pcm, level: Math.sqrt(this.energy / this.size) }, [pcm]);
        this.filled = 0;
        this.energy = 0;
      }
    }
    return true;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
