{{- define "vita-training.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vita-training.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vita
{{ include "vita-training.selectorLabels" . }}
{{- end -}}

{{- define "vita-training.selectorLabels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vita-training.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) .Values.image.tag) -}}
{{- end -}}

{{/* Marker file `vita export` leaves for the engine Job; per revision, so an older run's marker never counts. */}}
{{- define "vita-training.exportDone" -}}
{{- printf "%s/.vita-export-done-r%d" .Values.output.mountPath (int .Release.Revision) -}}
{{- end -}}

{{/* The stage entries as the run uses them, as JSON {"stages": [...]}: each with its config file name
(<name>.json: JSON, because YAML 1.1 readers take a rendered 2e-05 for a string), its config (`stage` set from the
entry, `output_dir` defaulting to <output>/checkpoints/<name>) and that output_dir as a path. Whatever would only
fail once the pods run fails the render instead: a name used twice, two entries sharing an output_dir, a config
whose `stage` is not the entry's, checkpoints outside the output claim (lost with the pod: no retry could resume). */}}
{{- define "vita-training.stages" -}}
{{- $root := . -}}
{{- $out := list -}}
{{- $names := dict -}}
{{- $dirs := dict -}}
{{- range $i, $s := .Values.stages -}}
{{- $where := printf "stages[%d] (%s)" $i $s.name -}}
{{- if hasKey $names $s.name -}}
{{- fail (printf "%s: name %q is already stages[%v]'s; each entry needs its own name (it names the config file and the default output_dir)" $where $s.name (get $names $s.name)) -}}
{{- end -}}
{{- $_ := set $names $s.name $i -}}
{{- $c := deepCopy $s.config -}}
{{- if and (hasKey $c "stage") (ne (toString $c.stage) (toString $s.stage)) -}}
{{- fail (printf "%s: config.stage is %v but the entry is stage %v" $where $c.stage $s.stage) -}}
{{- end -}}
{{- $_ := set $c "stage" (int $s.stage) -}}
{{- if not $c.output_dir -}}
{{- $_ := set $c "output_dir" (printf "${VITA_OUTPUT_DIR}/checkpoints/%s" $s.name) -}}
{{- end -}}
{{- $dir := include "vita-training.path" (dict "root" $root "path" $c.output_dir "where" (printf "%s: config.output_dir" $where)) -}}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" $root.Values.output.mountPath)) $dir) -}}
{{- fail (printf "%s: config.output_dir %s is not on the output claim (%s): its checkpoints would be lost with the pod" $where $c.output_dir $root.Values.output.mountPath) -}}
{{- end -}}
{{- if hasKey $dirs $dir -}}
{{- fail (printf "%s: config.output_dir %s is also stages[%v]'s; each entry needs its own (its checkpoints, its final/)" $where $dir (get $dirs $dir)) -}}
{{- end -}}
{{- $_ := set $dirs $dir $i -}}
{{- $out = append $out (dict "name" $s.name "stage" (int $s.stage) "file" (printf "%s.json" $s.name) "config" $c "outputDir" $dir "extraArgs" (default list $s.extraArgs)) -}}
{{- end -}}
{{- toJson (dict "stages" $out) -}}
{{- end -}}

{{/* A path as the pods see it: ${VITA_OUTPUT_DIR} and ${VITA_DATA_DIR} (the only variables the chart sets)
replaced by the mount paths; any other `$` fails the render. Args: root, path, where. */}}
{{- define "vita-training.path" -}}
{{- $p := .path | replace "${VITA_OUTPUT_DIR}" .root.Values.output.mountPath | replace "${VITA_DATA_DIR}" .root.Values.data.mountPath -}}
{{- if not (regexMatch "^/[A-Za-z0-9._/@+=,-]*$" $p) -}}
{{- fail (printf "%s: %q must be an absolute path of letters, digits and ._/@+=,- with ${VITA_OUTPUT_DIR} and ${VITA_DATA_DIR} the only variables in it" .where .path) -}}
{{- end -}}
{{- trimSuffix "/" (clean $p) -}}
{{- end -}}

{{/* Where `vita export` writes: the model directory and the Triton model repository, on the output claim at the
subPaths helm/vita mounts (model.pvc.subPath, triton.modelRepository.pvc.subPath). */}}
{{- define "vita-training.modelDir" -}}
{{- $m := printf "%s/" (clean .Values.export.model) -}}
{{- $r := printf "%s/" (clean .Values.export.modelRepository) -}}
{{- if or (hasPrefix $m $r) (hasPrefix $r $m) -}}
{{- fail (printf "export.model (%s) and export.modelRepository (%s) must be separate directories: `vita export --overwrite` replaces the model directory whole" .Values.export.model .Values.export.modelRepository) -}}
{{- end -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.output.mountPath) .Values.export.model -}}
{{- end -}}
{{- define "vita-training.modelRepository" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.output.mountPath) .Values.export.modelRepository -}}
{{- end -}}

{{/* The checkpoint `vita export` reads: export.checkpoint, else the last stage's output_dir. */}}
{{- define "vita-training.exportCheckpoint" -}}
{{- if .Values.export.checkpoint -}}
{{- include "vita-training.path" (dict "root" . "path" .Values.export.checkpoint "where" "export.checkpoint") -}}
{{- else -}}
{{- (last (include "vita-training.stages" . | fromJson).stages).outputDir -}}
{{- end -}}
{{- end -}}

{{/* The whole run on one node. torchrun takes every setting from PET_* variables (set by the indexed Job below,
or by the Kubeflow Trainer runtime), so the script is the same in both modes.

Resuming: the Job's first try of a release revision starts each stage fresh (and stops, as `vita train` would, on
an output_dir that already holds checkpoints: an earlier run's); a retry (the same revision, a new pod) passes
--resume to every stage this revision started, which continues from the newest checkpoint (a finished stage
trains nothing). The record of what this revision started is a marker per stage and node on the output claim.
`resume: always` passes --resume every time (continuing an earlier revision's checkpoints). */}}
{{- define "vita-training.script" -}}
{{- $stages := (include "vita-training.stages" . | fromJson).stages -}}
set -eu
echo "node ${PET_NODE_RANK} of ${PET_NNODES}, ${PET_NPROC_PER_NODE} processes, rendezvous ${PET_MASTER_ADDR}:${PET_MASTER_PORT}"
tries={{ printf "%s/.vita-training/%s-r%d" (trimSuffix "/" .Values.output.mountPath) .Release.Name (int .Release.Revision) | squote }}
mkdir -p "$tries"
{{- range $stages }}
{{- if eq $.Values.resume "always" }}
resume=--resume
{{- else }}
if [ -e "$tries/{{ .name }}.node-${PET_NODE_RANK}" ]; then
  resume=--resume
  echo "{{ .name }}: a retry, resuming from the newest checkpoint in {{ .outputDir }}"
elif [ -e {{ printf "%s/checkpoints/latest" .outputDir | squote }} ]; then
  echo "{{ .name }}: {{ .outputDir }} already holds checkpoints of an earlier run: remove them, choose another output_dir, or set resume: always to continue that run" >&2
  exit 2
else
  resume=
  touch "$tries/{{ .name }}.node-${PET_NODE_RANK}"
fi
{{- end }}
torchrun --no-python vita train --stage {{ .stage }} --config /etc/vita-training/{{ .file }} $resume{{ range .extraArgs }} {{ . | squote }}{{ end }}
{{- end }}
{{- if .Values.export.enabled }}
if [ "${PET_NODE_RANK}" = 0 ]; then
  vita export --checkpoint {{ include "vita-training.exportCheckpoint" . | squote }} --output {{ include "vita-training.modelDir" . | squote }} --overwrite --templates {{ .Values.export.templates | squote }}{{ range .Values.export.args }} {{ . | squote }}{{ end }}
  # helm/vita's Triton reads the model repository (tensorrt_llm/config.pbtxt; the engine Job adds tensorrt_llm/1/)
  mkdir -p {{ include "vita-training.modelRepository" . | squote }}
  cp -R {{ printf "%s/triton/." (include "vita-training.modelDir" .) | squote }} {{ include "vita-training.modelRepository" . | squote }}
  touch {{ include "vita-training.exportDone" . | squote }}
fi
{{- end }}
{{- end -}}

{{- define "vita-training.env" -}}
- {name: VITA_DATA_DIR, value: {{ .Values.data.mountPath | quote }}}
- {name: VITA_OUTPUT_DIR, value: {{ .Values.output.mountPath | quote }}}
- {name: VITA_HOME, value: /var/lib/vita}
- {name: HOME, value: /var/lib/vita}
- {name: PYTHONUNBUFFERED, value: "1"}
{{- end -}}

{{- define "vita-training.volumeMounts" -}}
- {name: data, mountPath: {{ .Values.data.mountPath }}, readOnly: true}
- {name: output, mountPath: {{ .Values.output.mountPath }}}
- {name: config, mountPath: /etc/vita-training, readOnly: true}
- {name: tmp, mountPath: /tmp}
- {name: home, mountPath: /var/lib/vita}
- {name: shm, mountPath: /dev/shm}
{{- end -}}

{{- define "vita-training.volumes" -}}
- name: data
  persistentVolumeClaim: {claimName: {{ .Values.data.claimName }}, readOnly: true}
- name: output
  persistentVolumeClaim: {claimName: {{ .Values.output.claimName }}}
- name: config
  configMap: {name: {{ include "vita-training.fullname" . }}-config}
- name: tmp
  emptyDir: {sizeLimit: 16Gi}
- name: home
  emptyDir: {sizeLimit: 16Gi}
- name: shm
  emptyDir: {medium: Memory, sizeLimit: {{ .Values.shmSize }}}
{{- end -}}

{{- define "vita-training.resources" -}}
{{- $r := deepCopy .Values.resources -}}
{{- if gt (int .Values.gpusPerNode) 0 -}}
{{- $limits := default dict $r.limits -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .Values.gpusPerNode) -}}
{{- $_ := set $r "limits" $limits -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{- define "vita-training.nproc" -}}
{{- if gt (int .Values.gpusPerNode) 0 }}{{ int .Values.gpusPerNode }}{{ else }}1{{ end -}}
{{- end -}}
