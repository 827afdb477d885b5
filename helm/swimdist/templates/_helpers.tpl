{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "swimdist.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified name: "<release>-<chart>", or the release name when it already contains the
chart name. Truncated to leave room for the longest suffix ("-scheduler", 10 characters).
*/}}
{{- define "swimdist.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 53 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 53 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 53 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "swimdist.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels of one component. Call with (list $ "scheduler").
*/}}
{{- define "swimdist.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "swimdist.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/*
All labels of one component. Call with (list $ "scheduler").
*/}}
{{- define "swimdist.labels" -}}
{{- $ := index . 0 -}}
{{ include "swimdist.selectorLabels" . }}
helm.sh/chart: {{ include "swimdist.chart" $ }}
app.kubernetes.io/version: {{ $.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $.Release.Service }}
app.kubernetes.io/part-of: {{ include "swimdist.fullname" $ }}
{{- end -}}

{{/*
Container image of a component: the top-level image merged with the component's overrides.
Call with (list $ .Values.worker.image).
*/}}
{{- define "swimdist.image" -}}
{{- $ := index . 0 -}}
{{- $img := merge (deepCopy (index . 1 | default dict)) $.Values.image -}}
{{- printf "%s:%s" $img.repository (toString ($img.tag | default $.Chart.AppVersion)) -}}
{{- end -}}

{{- define "swimdist.imagePullPolicy" -}}
{{- $ := index . 0 -}}
{{- $img := merge (deepCopy (index . 1 | default dict)) $.Values.image -}}
{{- $img.pullPolicy -}}
{{- end -}}

{{- define "swimdist.imagePullSecrets" -}}
{{- $ := index . 0 -}}
{{- $img := merge (deepCopy (index . 1 | default dict)) $.Values.image -}}
{{- with $img.pullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{/*
Scheduler address as seen from inside the cluster.
*/}}
{{- define "swimdist.schedulerAddress" -}}
{{- printf "%s://%s-scheduler:%v" (ternary "tls" "tcp" .Values.tls.enabled) (include "swimdist.fullname" .) .Values.scheduler.servicePort -}}
{{- end -}}

{{/*
Dask TLS (tls.enabled): the CA, certificate and key flags shared by `dask scheduler`,
`dask worker` and `swimdist train`, and the read-only Secret volume they come from. The
dask-kubernetes operator hands out tcp:// addresses, so TLS is refused with daskJob.enabled.
*/}}
{{- define "swimdist.tlsArgs" -}}
{{- if .Values.tls.enabled -}}
{{- if .Values.daskJob.enabled -}}
{{- fail "tls.enabled cannot be combined with daskJob.enabled: the dask-kubernetes operator gives the job and the workers a tcp:// scheduler address. Use the batch Job (daskJob.enabled=false) for a TLS cluster." -}}
{{- end -}}
{{- $d := .Values.tls.mountPath | trimSuffix "/" }}
- --tls-ca-file
- {{ printf "%s/ca.crt" $d | quote }}
- --tls-cert
- {{ printf "%s/tls.crt" $d | quote }}
- --tls-key
- {{ printf "%s/tls.key" $d | quote }}
{{- end -}}
{{- end -}}

{{- define "swimdist.tlsVolumes" -}}
{{- if .Values.tls.enabled -}}
- name: dask-tls
  secret:
    secretName: {{ required "tls.secretName is required when tls.enabled is true: a Secret with ca.crt, tls.crt and tls.key" .Values.tls.secretName | quote }}
    defaultMode: 288
{{- end -}}
{{- end -}}

{{- define "swimdist.tlsVolumeMounts" -}}
{{- if .Values.tls.enabled -}}
- name: dask-tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/*
Whole cores of a Kubernetes CPU quantity ("2", 2, 2.5, "1500m"), rounded down, at least 1.
*/}}
{{- define "swimdist.cpuCores" -}}
{{- $q := toString . -}}
{{- if hasSuffix "m" $q -}}
{{- max 1 (div (atoi (trimSuffix "m" $q)) 1000) -}}
{{- else -}}
{{- max 1 (int (floor (float64 $q))) -}}
{{- end -}}
{{- end -}}

{{/*
`dask worker --nthreads`: whole cores of worker.resources.limits.cpu, or worker.threads when
that is set and does not exceed them. Empty when neither is set (Dask then uses every core
of the node).
*/}}
{{- define "swimdist.workerThreads" -}}
{{- $w := .Values.worker -}}
{{- $cpu := dig "limits" "cpu" "" ($w.resources | default dict) -}}
{{- if $cpu -}}
{{- $cores := include "swimdist.cpuCores" $cpu | int -}}
{{- if $w.threads -}}
{{- if gt (int $w.threads) $cores -}}
{{- fail (printf "worker.threads=%v exceeds worker.resources.limits.cpu=%v (%d whole cores): more threads than cores oversubscribe BLAS and LAPACK. Lower worker.threads or raise the CPU limit." $w.threads $cpu $cores) -}}
{{- end -}}
{{- int $w.threads -}}
{{- else -}}
{{- $cores -}}
{{- end -}}
{{- else if $w.threads -}}
{{- int $w.threads -}}
{{- end -}}
{{- end -}}

{{/*
`dask worker --memory-limit`: worker.resources.limits.memory (a Kubernetes quantity such as
"8Gi", which Dask parses with the same meaning), or worker.memoryLimit for workers without a
memory limit. Setting both is an error: the two would disagree about when the pod is killed.
*/}}
{{- define "swimdist.workerMemoryLimit" -}}
{{- $w := .Values.worker -}}
{{- $mem := dig "limits" "memory" "" ($w.resources | default dict) -}}
{{- if and $mem $w.memoryLimit -}}
{{- fail (printf "worker.memoryLimit=%v and worker.resources.limits.memory=%v are both set: the Dask memory limit is derived from the container limit. Remove worker.memoryLimit." $w.memoryLimit $mem) -}}
{{- end -}}
{{- toString ($mem | default $w.memoryLimit | default "") -}}
{{- end -}}

{{/*
Shared data volume (PVC) of the workers and the training job, if any.
*/}}
{{- define "swimdist.dataClaim" -}}
{{- if .Values.storage.pvc.existingClaim -}}
{{- .Values.storage.pvc.existingClaim -}}
{{- else if .Values.storage.pvc.create -}}
{{- printf "%s-data" (include "swimdist.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
Environment shared by workers and the training job for object stores. Call with
(list $ .Values.worker.env).
*/}}
{{- define "swimdist.env" -}}
{{- $ := index . 0 -}}
{{- $env := concat (index . 1 | default list) ($.Values.storage.objectStore.env | default list) -}}
{{- with $env }}
env:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $.Values.storage.objectStore.secretName }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end -}}
{{- end -}}

{{/*
`dask scheduler` arguments (container args: the image's entrypoint stays in place).
*/}}
{{- define "swimdist.schedulerArgs" -}}
- dask
- scheduler
- --port
- {{ .Values.scheduler.servicePort | quote }}
- --dashboard-address
- {{ printf ":%v" .Values.scheduler.dashboardPort | quote }}
{{- if .Values.tls.enabled }}
- --protocol
- tls
{{- include "swimdist.tlsArgs" . | nindent 0 }}
{{- end }}
{{- with .Values.scheduler.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
`dask worker` arguments without the scheduler address. Call with (list $ "$(POD_NAME)").
*/}}
{{- define "swimdist.workerArgs" -}}
{{- $ := index . 0 -}}
- --name
- {{ index . 1 | quote }}
{{- with include "swimdist.workerThreads" $ }}
- --nthreads
- {{ . | quote }}
{{- end }}
{{- with include "swimdist.workerMemoryLimit" $ }}
- --memory-limit
- {{ . | quote }}
{{- end }}
- --dashboard-address
- {{ printf ":%v" $.Values.worker.dashboardPort | quote }}
{{- with include "swimdist.tlsArgs" $ }}
{{- . | nindent 0 }}
{{- end }}
{{- with $.Values.worker.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Volumes of the workers and the job: the shared data claim plus extra volumes.
Call with (list $ .Values.worker.volumes).
*/}}
{{- define "swimdist.dataVolumes" -}}
{{- $ := index . 0 -}}
{{- $claim := include "swimdist.dataClaim" $ -}}
{{- if or $claim (index . 1) }}
volumes:
{{- if $claim }}
  - name: data
    persistentVolumeClaim:
      claimName: {{ $claim }}
{{- end }}
{{- with index . 1 }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
{{- end -}}

{{- define "swimdist.dataVolumeMounts" -}}
{{- $ := index . 0 -}}
{{- $claim := include "swimdist.dataClaim" $ -}}
{{- if or $claim (index . 1) }}
volumeMounts:
{{- if $claim }}
  - name: data
    mountPath: {{ $.Values.storage.mountPath }}
{{- end }}
{{- with index . 1 }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
{{- end -}}

{{/*
Name of the training Job: one per release revision, so `helm upgrade` starts a new run
instead of failing on the immutable pod template of the previous Job.
*/}}
{{- define "swimdist.trainJobName" -}}
{{- printf "%s-train-%d" (include "swimdist.fullname" . | trunc 48 | trimSuffix "-") (int .Release.Revision) -}}
{{- end -}}

{{/*
Pod spec of the training run. Call with (list $ true) to pass the chart's scheduler address
(batch Job), (list $ false) to rely on DASK_SCHEDULER_ADDRESS (the DaskJob operator sets it).
*/}}
{{- define "swimdist.trainPodSpec" -}}
{{- $ := index . 0 -}}
{{- $j := $.Values.train.job -}}
{{- $claim := include "swimdist.dataClaim" $ -}}
restartPolicy: {{ $j.restartPolicy }}
{{- with include "swimdist.imagePullSecrets" (list $ $j.image) | trim }}{{ . | nindent 0 }}{{- end }}
{{- with $j.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with $j.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: train
    image: {{ include "swimdist.image" (list $ $j.image) | quote }}
    imagePullPolicy: {{ include "swimdist.imagePullPolicy" (list $ $j.image) }}
    # args, not command: the Dask image's entrypoint (prepare.sh, EXTRA_PIP_PACKAGES) runs first.
    args:
      - swimdist
      - train
      - --config
      - {{ $j.configPath | quote }}
      {{- if index . 1 }}
      - --scheduler
      - {{ include "swimdist.schedulerAddress" $ | quote }}
      {{- end }}
      {{- with include "swimdist.tlsArgs" $ }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- with $j.extraArgs }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with include "swimdist.env" (list $ $j.env) | trim }}{{ . | nindent 4 }}{{- end }}
    {{- with $j.resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      - name: job-spec
        mountPath: {{ dir $j.configPath }}
        readOnly: true
      - name: data
        mountPath: {{ $.Values.storage.mountPath }}
      {{- with include "swimdist.tlsVolumeMounts" $ }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- with $j.volumeMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with $j.securityContext }}
    securityContext:
      {{- toYaml . | nindent 6 }}
    {{- end }}
volumes:
  - name: job-spec
    configMap:
      name: {{ include "swimdist.fullname" $ }}-job
      items:
        - key: job.yaml
          path: {{ base $j.configPath }}
  - name: data
    {{- if $claim }}
    persistentVolumeClaim:
      claimName: {{ $claim }}
    {{- else }}
    emptyDir: {}
    {{- end }}
  {{- with include "swimdist.tlsVolumes" $ }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- with $j.volumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $j.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $j.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $j.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
